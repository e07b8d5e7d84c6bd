"""The recipes end to end on the built-in tiny model (a few steps each, in-process), resume, and bad input."""

import csv
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs

from finetune import adapter, full, loop, lora, qlora, trainer
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.data import Builtin
from lit_gpt.tiny_model import ensure_tiny_checkpoint

FAST_TRAIN = dict(global_batch_size=4, micro_batch_size=2, lr_warmup_steps=1, max_steps=4, save_interval=2,
                  log_interval=1, min_lr=0.0)


def fast(tmp_path: Path, **train) -> dict:
    return dict(
        out_dir=tmp_path,
        data=Builtin(num_samples=64),
        train=TrainArgs(**{**FAST_TRAIN, **train}),
        eval=EvalArgs(interval=2, max_iters=2),
    )


def logged(out_dir: Path, column: str = "loss") -> dict:
    """step -> metrics row that holds ``column``, over every logger version (a resumed run writes a new one)."""
    rows = {}
    for path in sorted(out_dir.glob("logs/csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    rows[int(float(row["step"]))] = row
    return rows


@pytest.mark.parametrize(
    "recipe, final_file",
    [(full, "lit_model.pth"), (lora, "lit_model.pth"), (qlora, "lit_model.pth"), (adapter, "lit_model.pth.adapter_v2")],
)
def test_recipe_runs_with_sensitivity_allocation(tmp_path, recipe, final_file):
    recipe.setup(dropbp=DropBPArgs(rate=0.75, sensitivity_at=0.25, sampling="fixed"), **fast(tmp_path))
    assert (tmp_path / "final" / final_file).is_file()
    assert (tmp_path / "step-000002" / "training_state.pth").is_file()
    report = json.loads((tmp_path / "dropbp_allocation.json").read_text())
    assert report["mean_rate"] == pytest.approx(0.75, abs=0.1) and len(report["branches"]) == 16
    assert (tmp_path / "dropbp_allocation.png").is_file()
    rows = logged(tmp_path)
    assert sorted(rows) == [1, 2, 3, 4] and all(float(r["drop_rate"]) > 0 for r in rows.values())
    # no file of the run shares an inode with the base checkpoint: writing to it must never reach the base model
    base = {(f.stat().st_dev, f.stat().st_ino) for f in ensure_tiny_checkpoint().iterdir()}
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and (f.stat().st_dev, f.stat().st_ino) in base]
    if recipe is adapter:  # a complete final/: the base weights beside the adapter's
        assert (tmp_path / "final" / "lit_model.pth").read_bytes() == (
            ensure_tiny_checkpoint() / "lit_model.pth").read_bytes()
    if recipe in (lora, qlora):  # merged: a plain litgpt state dict that litgpt's GPT loads strictly
        from litgpt.config import Config
        from litgpt.model import GPT

        model = GPT(Config.from_file(tmp_path / "final" / "model_config.yaml"))
        model.load_state_dict(torch.load(tmp_path / "final" / "lit_model.pth", weights_only=True))


# over 30 s: Dynamo traces every graph of a run (training and evaluation, the sensitivity pass, a second length
# made dynamic), and inductor generates LoRA's kernels
@pytest.mark.parametrize("recipe, weights", [(lora, "lit_model.pth"), (adapter, "lit_model.pth.adapter_v2")],
                         ids=["lora", "adapter"])
def test_compiled_branches_recipe(tmp_path, capsys, monkeypatch, recipe, weights):
    """``--compile true``: the LoRA recipe with litgpt's default targets (q and v), and the adapter-v2 recipe, with a
    sensitivity pass and DropBP, batches of varying length (dynamic shapes), train, validate, save and record the
    option. LoRA compiles with inductor, as a user's run; the adapter's graphs with Dynamo's "eager" backend (the
    same graphs and guards, no kernel generation: 2.5 minutes less; tests/test_compile.py checks them too)."""
    import functools

    import torch._dynamo

    if recipe is adapter:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    targets = dict(lora_key=False, lora_projection=False, lora_mlp=False) if recipe is lora else {}
    try:
        recipe.setup(**targets, compile=True, dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.25), **fast(tmp_path))
    finally:
        torch._dynamo.reset()
    assert "branches compiled" in capsys.readouterr().out
    assert (tmp_path / "final" / weights).is_file()
    assert "compile: true" in (tmp_path / "final" / "hyperparameters.yaml").read_text()
    assert sorted(logged(tmp_path)) == [1, 2, 3, 4]


def test_lora_with_pld_baseline(tmp_path):
    lora.setup(pld=PLDArgs(enabled=True, gamma=0.5), **fast(tmp_path))
    rows = logged(tmp_path)
    assert any(float(r["drop_rate"]) > 0 for r in rows.values())  # PLD skipped some branches
    assert not (tmp_path / "dropbp_allocation.json").exists()


def test_p0_loss_curve_is_deterministic_and_resume_continues_identically(tmp_path, monkeypatch):
    """An interrupted run resumed with --resume auto logs the same losses as an uninterrupted one."""
    args = dict(dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.5), train=TrainArgs(**{**FAST_TRAIN, "max_steps": 6}))
    full_run = tmp_path / "uninterrupted"
    lora.setup(**{**fast(full_run), **args})
    expected = {s: r["loss"] for s, r in logged(full_run).items()}

    broken = tmp_path / "interrupted"
    save = loop.save_training_state

    def save_then_die(*a, **k):  # Ctrl-C right after the save of step 4
        save(*a, **k)
        if a[3]["progress"]["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_training_state", save_then_die)
    with pytest.raises(trainer.Interrupted, match="step-000004/training_state.pth holds step 4; continue with"):
        lora.setup(**{**fast(broken), **args})
    monkeypatch.setattr(loop, "save_training_state", save)
    assert not (broken / "final").exists()
    lora.setup(**{**fast(broken), **args}, resume="auto")
    resumed = {s: r["loss"] for s, r in logged(broken).items()}
    assert resumed == expected
    # the branch FLOPs the allocation used travel with the checkpoint: the same drop rate is logged after resuming
    drop = lambda out: {s: r["drop_rate"] for s, r in logged(out).items()}  # noqa: E731
    assert drop(broken) == drop(full_run)


def run_cli(recipe, argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["recipe.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(recipe.setup)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys):
    ckpt = ensure_tiny_checkpoint()
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_config.yaml").write_text((ckpt / "model_config.yaml").read_text())
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"')
    no_output = tmp_path / "no_output.json"
    no_output.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 4 + [{"instruction": "c"}] * 4))
    ten = tmp_path / "ten.json"
    ten.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = ["--out_dir", str(tmp_path / "out")]
    cases = [
        (lora, ["--dropbp.rate", "1.0"], "--dropbp.rate must be in [0, 1)"),
        (lora, ["--dropbp.rate", "-0.5"], "--dropbp.rate must be in [0, 1)"),
        (lora, ["--dropbp.rate", "0.95"], "--dropbp.rate 0.95 is above --dropbp.max_rate 0.9"),
        (full, ["--dropbp.rate", "0.5", "--pld.enabled", "true"], "PLD and DropBP are both on"),
        (lora, ["--checkpoint_dir", str(tmp_path / "nope")], "not found"),
        (lora, ["--checkpoint_dir", str(incomplete)], "is incomplete: missing lit_model.pth"),
        (lora, ["--data", "JSON", "--data.json_path", str(bad_json)], "not valid JSON"),
        (lora, ["--data", "JSON", "--data.json_path", str(no_output), "--data.val_split_fraction", "0.5"],
         "lacks field(s) output"),
        (lora, ["--train.max_seq_length", "100000"], "above the model's block size 256"),
        (lora, ["--data", "NoSuchData"], "NoSuchData"),
        (qlora, ["--precision", "bf16-mixed"], "QLoRA needs one of --precision"),
        (lora, ["--dropbp.rate", "0.5", "--dropbp.min_rate", "0.6"], "--dropbp.min_rate 0.6 is above --dropbp.rate"),
        (lora, ["--dropbp.step", "0"], "--dropbp.step must be in (0, 1]"),
        (lora, ["--train.micro_batch_size", "0"], "--train.micro_batch_size must be at least 1"),
        (lora, ["--train.max_tokens", "1000"], "--train.max_tokens is not supported"),
        (lora, ["--data", "JSON", "--data.json_path", str(ten), "--data.val_split_fraction", "0.05"],
         "the validation split is empty"),
        (lora, ["--data", "JSON", "--data.json_path", str(empty), "--data.val_split_fraction", "0.5"],
         "the training split is empty"),
        (lora, ["--eval.evaluate_example", "1000"], "--eval.evaluate_example must be first, random or an index"),
        (qlora, ["--compile", "true"], "--compile true does not work with QLoRA on the CPU"),
        (lora, ["--compile", "true", "--devices", "2"], "--compile true runs on one device"),
    ]
    for recipe, argv, message in cases:
        line = run_cli(recipe, [*argv, *out], monkeypatch, capsys)
        assert message in line, (argv, line)
    assert not (tmp_path / "out" / "final").exists()


def test_an_out_dir_that_is_a_file_is_bad_input(tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a run")
    monkeypatch.setattr(sys, "argv", ["lora.py", "--out_dir", str(taken)])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --out_dir {taken} exists and is not a directory"
    assert taken.read_text() == "not a run"


def test_real_records_an_example_index_and_uniform_rates_above_the_allocation_cap(tmp_path, monkeypatch, capsys):
    """From the command line: real Alpaca records up to 832 tokens on the built-in model (block size 256) are cut at
    the block size and said so; ``--eval.evaluate_example 3`` is an index; ``--dropbp.allocation uniform`` takes any
    rate below 1 (``--dropbp.max_rate`` bounds the sensitivity allocation only); no DataLoader warning about more
    workers than cores."""
    records = Path(__file__).parent / "fixtures" / "alpaca-sample.json"
    monkeypatch.setattr(sys, "argv", [
        "lora.py", "--data", "JSON", "--data.json_path", str(records), "--data.val_split_fraction", "0.2",
        "--eval.evaluate_example", "3", "--eval.max_new_tokens", "3", "--eval.interval", "2",
        "--dropbp.allocation", "uniform", "--dropbp.rate", "0.99", "--train.max_steps", "2",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--out_dir", str(tmp_path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.cli(lora.setup)
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    assert "--train.max_seq_length not set: samples are cut at the model's block size, 256 tokens" in out
    assert out.count(" -> '") == 1  # the example was generated, for record 3 of the validation split
    rows = logged(tmp_path)
    assert sorted(rows) == [1, 2] and all(float(r["drop_rate"]) > 0.9 for r in rows.values())
    assert (tmp_path / "final" / "lit_model.pth").is_file()


@pytest.mark.parametrize("targets, kept_kind", [
    (dict(lora_key=False, lora_projection=False, lora_mlp=False), "mlp"),  # litgpt's default targets: q and v
    (dict(lora_query=False, lora_key=False, lora_value=False, lora_projection=False), "attn"),  # MLP only
    (dict(lora_key=False, lora_projection=False, lora_mlp=False, lora_head=True), None),  # head: always a graph
])
def test_lora_subsets_train_through_micro_batches_that_keep_nothing_trainable(tmp_path, monkeypatch, targets,
                                                                              kept_kind):
    """Micro-batches whose kept branches hold no LoRA weight have no graph: backward is skipped for them alone, and
    an optimizer step made only of such micro-batches leaves those weights (and their Adam state) untouched."""
    from dropbp import DropBPHandler

    sample, fit, masks, states = DropBPHandler.sample, trainer.fit, [], []
    forced = {1, 2, 3}  # the last micro-batch of step 1 and both of step 2

    def forcing_sample(handler):
        mask = sample(handler)
        mask = torch.tensor([len(masks) in forced and g.kind != kept_kind for g in handler.gates])
        handler.set_mask(mask)  # the other micro-batches keep every branch
        masks.append(mask)
        return mask

    def recording_fit(run, *args):
        model, optimizer = run.model, run.optimizer
        snapshot = lambda *_: states.append(  # noqa: E731
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        snapshot()
        optimizer.optimizer.register_step_post_hook(snapshot)
        fit(run, *args)

    monkeypatch.setattr(DropBPHandler, "sample", forcing_sample)
    monkeypatch.setattr(trainer, "fit", recording_fit)
    lora.setup(dropbp=DropBPArgs(rate=0.875, allocation="uniform"), **targets,
               **fast(tmp_path, max_steps=3, save_interval=None))
    assert len(masks) == 6 and len(states) == 4
    changed = lambda a, b: {n for n in a if not torch.equal(a[n], b[n])}  # noqa: E731
    assert changed(states[0], states[1]) and changed(states[2], states[3])  # ordinary steps train
    step2 = changed(states[1], states[2])
    assert step2 == ({n for n in states[1] if "lm_head" in n} if kept_kind is None else set())
    assert (tmp_path / "final" / "lit_model.pth").is_file()


def test_litgpt_options_warmup_fraction_initial_validation_example_and_max_time(tmp_path, capsys):
    """Options litgpt's recipes honour are honoured here too, not accepted and ignored."""
    lora.setup(**{**fast(tmp_path, lr_warmup_steps=None, lr_warmup_fraction=0.5, max_steps=4),
                  "eval": EvalArgs(interval=2, max_iters=2, initial_validation=True, max_new_tokens=5)},
               optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}})
    rows = logged(tmp_path)
    # 56 training samples / micro-batch 2 / accumulation 2 = 14 steps per epoch: warm-up over ceil(0.5 * 14) = 7 steps
    assert [float(rows[s]["learning_rate"]) for s in (1, 2)] == pytest.approx([0.01 / 7, 0.02 / 7])
    out = capsys.readouterr().out
    assert "Initial evaluation | val loss" in out
    assert 0 in logged(tmp_path, "val_loss")
    assert out.count(" -> '") == 2  # an example generated at each of the two validations

    timed = tmp_path / "timed"
    lora.setup(**fast(timed, max_steps=50, max_time=1e-6))
    assert sorted(logged(timed)) == [1] and (timed / "final" / "lit_model.pth").is_file()
    assert "--train.max_time 1e-06s reached after step 1: stopping" in capsys.readouterr().out
