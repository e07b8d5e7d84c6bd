"""The recipes end to end on the built-in tiny model (a few steps each, in-process), resume, and bad input."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs

from finetune import adapter, full, lora, qlora, trainer
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


def logged(out_dir: Path) -> dict:
    """step -> metrics row, over every logger version (a resumed run writes a new one)."""
    rows = {}
    for path in sorted(out_dir.glob("logs/csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("loss"):
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
    if recipe in (lora, qlora):  # merged: a plain litgpt state dict that litgpt's GPT loads strictly
        from litgpt.config import Config
        from litgpt.model import GPT

        model = GPT(Config.from_file(tmp_path / "final" / "model_config.yaml"))
        model.load_state_dict(torch.load(tmp_path / "final" / "lit_model.pth", weights_only=True))


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
    save = trainer.save_training_state

    def save_then_die(*a, **k):
        save(*a, **k)
        if a[5]["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        lora.setup(**{**fast(broken), **args})
    monkeypatch.setattr(trainer, "save_training_state", save)
    assert not (broken / "final").exists()
    lora.setup(**{**fast(broken), **args}, resume="auto")
    resumed = {s: r["loss"] for s, r in logged(broken).items()}
    assert resumed == expected


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
    ]
    for recipe, argv, message in cases:
        line = run_cli(recipe, [*argv, *out], monkeypatch, capsys)
        assert message in line, (argv, line)
    assert not (tmp_path / "out" / "final").exists()
