"""What a user hits around a run: a used out_dir, a running run, resuming with other options or from a corrupt
checkpoint, Ctrl-C, the recorded options, choice options and --help."""

import sys

import pytest
import torch
import yaml
from jsonargparse import capture_parser

from finetune import lora, trainer
from finetune.args import DropBPArgs
from tests.test_recipes import fast, logged, run_cli


def test_a_used_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch, capsys):
    lora.setup(**fast(tmp_path, max_steps=2))
    first = (tmp_path / "final" / "lit_model.pth").read_bytes()
    with pytest.raises(trainer.UsageError, match="already holds a run .*--resume auto.*--overwrite true"):
        lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5))
    assert (tmp_path / "final" / "lit_model.pth").read_bytes() == first  # untouched
    assert not (tmp_path / trainer.LOCK).exists()  # released after the refusal and after the run

    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5), overwrite=True)
    assert sorted(logged(tmp_path)) == [1, 2] and len(list(tmp_path.glob("logs/csv/version_*"))) == 1

    (tmp_path / trainer.LOCK).write_text(f"{trainer.socket.gethostname()} {trainer.os.getppid()}")  # a live process
    with pytest.raises(trainer.UsageError, match="is in use by a running run"):
        lora.setup(**fast(tmp_path, max_steps=2), overwrite=True)
    (tmp_path / trainer.LOCK).write_text(f"{trainer.socket.gethostname()} 999999999")  # a killed run's stale lock
    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5), resume="auto")


def test_options_are_recorded_and_resume_with_other_options_is_refused(tmp_path, capsys):
    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.875), lora_r=4)
    for folder in ("step-000002", "final"):
        record = yaml.safe_load((tmp_path / folder / trainer.RECORD).read_text())
        assert record["dropbp"]["rate"] == 0.875 and record["lora_r"] == 4 and record["train"]["max_steps"] == 2
    # the record is a --config file of the recipe
    parser = capture_parser(lambda: trainer.CLI(lora.setup, args=[]))
    parsed = parser.parse_args(["--config", str(tmp_path / "final" / trainer.RECORD)])
    assert parsed.dropbp.rate == 0.875 and parsed.lora_r == 4

    with pytest.raises(trainer.UsageError, match=r"dropbp.rate 0.875 -> 0.5; dropbp.sampling 'bernoulli' -> 'fixed'"):
        lora.setup(**fast(tmp_path, max_steps=4), dropbp=DropBPArgs(rate=0.5, sampling="fixed"), lora_r=4,
                   resume="auto")
    lora.setup(**fast(tmp_path, max_steps=3), dropbp=DropBPArgs(rate=0.875), lora_r=4, resume="auto")
    assert sorted(logged(tmp_path)) == [1, 2, 3]

    empty = tmp_path / "empty"
    lora.setup(**fast(empty, max_steps=1), resume="auto")
    assert f"--resume auto: no checkpoint in {empty}, starting from scratch" in capsys.readouterr().out


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    lora.setup(**fast(tmp_path, max_steps=4))  # saves steps 2 and 4
    latest = tmp_path / "step-000004" / "training_state.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # torn
    lora.setup(**fast(tmp_path, max_steps=5), resume="auto")
    out = capsys.readouterr().out
    assert f"warning: {latest} cannot be read" in out and "Resumed from" in out and "step-000002" in out
    assert sorted(logged(tmp_path))[-1] == 5


def test_failures_are_one_line_with_distinct_exit_statuses(tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    from lit_gpt.tiny_model import ensure_tiny_checkpoint

    for f in ensure_tiny_checkpoint().iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "lit_model.pth").write_bytes(b"not a checkpoint")
    out = ["--out_dir", str(tmp_path / "out")]
    assert "cannot be read as a litgpt checkpoint" in run_cli(lora, ["--checkpoint_dir", str(corrupt), "--data", "Builtin", *out],
                                                               monkeypatch, capsys)
    for argv, message in [
        (["--dropbp.allocation", "foo"], "--dropbp.allocation must be one of sensitivity, uniform, got 'foo'"),
        (["--dropbp.sampling=every"], "--dropbp.sampling must be one of bernoulli, fixed, got 'every'"),
        (["--logger_name", "wandb"], "--logger_name must be one of csv, tensorboard, got 'wandb'"),
    ]:
        assert run_cli(lora, [*argv, *out], monkeypatch, capsys) == f"error: {message}"

    save = trainer.save_training_state

    def interrupted(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_training_state", interrupted)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--train.max_steps", "3", "--train.save_interval", "2",
                                      "--train.global_batch_size", "4", "--train.micro_batch_size", "2", *out])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == trainer.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: ")

    def broken_step(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(torch.optim.AdamW, "step", broken_step)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--out_dir", str(tmp_path / "other"), "--train.max_steps", "2"])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == trainer.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
                       " (DROPBP_TRACEBACK=1 shows the traceback)")


def test_help_describes_every_option(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lora.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for description in ("Target average drop rate", "Final keep ratio of the last block",
                        "Number of optimizer steps between saving checkpoints", "replace a run already in out_dir"):
        assert description in " ".join(text.split()), description
