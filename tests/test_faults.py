"""Faults: a run killed with SIGKILL resumes with `--resume auto` and logs the losses of an uninterrupted run; a
diverged loss stops the run with one clear line; the same command twice gives the same loss curve."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs

from finetune import lora
from finetune.args import DropBPArgs
from lit_gpt.data import Builtin

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 16
SAVE_INTERVAL = 2
ARGS = [
    "--data", "Builtin", "--data.num_samples", "64", "--train.max_steps", str(MAX_STEPS),
    "--train.save_interval", str(SAVE_INTERVAL), "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
    "--train.max_seq_length", "64", "--eval.interval", "1000", "--eval.final_validation", "false",
    "--dropbp.rate", "0.5",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # other processes take the cores


def start(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "finetune" / "lora.py"), *ARGS, "--out_dir", str(out_dir),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(out_dir: Path, version: int) -> dict:
    """step -> loss as logged (text, compared exactly) by one logger version (a resumed run writes a new one).
    A row torn by the kill is left out: the CSV logger is not a checkpoint and rewrites its file in place."""
    path = out_dir / "logs" / "csv" / f"version_{version}" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("loss") and None not in row.values()]  # whole rows
    return {int(row["step"]): row["loss"] for row in rows}


def saved_steps(out_dir: Path) -> list:
    return sorted(int(p.parent.name[len("step-"):]) for p in out_dir.glob("step-*/training_state.pth"))


def assert_checkpoints_load(out_dir: Path) -> None:
    for path in out_dir.glob("step-*/training_state.pth"):
        state = torch.load(path, weights_only=False)
        assert state["progress"]["step"] == int(path.parent.name[len("step-"):]), path
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path


def test_sigkill_then_resume_auto_loses_at_most_the_unsaved_steps(tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = start(uninterrupted)
    victim = start(killed)

    # SIGKILL after a random number of saves (1 to 3) plus a random part of a step: possibly in the middle of a save
    rng = random.Random()
    saves, delay = rng.randint(1, 3), rng.uniform(0.0, 0.3)
    deadline = time.monotonic() + 180
    while len(saved_steps(killed)) < saves:
        assert victim.poll() is None, f"the run ended before {saves} saves: {victim.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.02)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    assert finish(victim)[0] == -signal.SIGKILL, f"the run finished before the kill ({saves} saves + {delay:.2f}s)"
    assert not (killed / "final").exists()
    assert_checkpoints_load(killed)
    last_saved = saved_steps(killed)[-1]
    logged_before_kill = losses(killed, 0)
    killed_at = f"killed after {saves} saves + {delay:.2f}s, last save at step {last_saved}"
    # only unsaved steps are lost: a kill during the save of step N loses that save, so at most SAVE_INTERVAL steps
    assert max(logged_before_kill, default=0) - last_saved <= SAVE_INTERVAL, killed_at

    code, out, err = finish(start(killed, "--resume", "auto"))
    assert code == 0, f"{killed_at}: {err[-2000:]}"
    assert f"Resumed from {killed / f'step-{last_saved:06d}' / 'training_state.pth'} at step {last_saved}" in out
    assert finish(reference)[0] == 0
    expected = losses(uninterrupted, 0)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    resumed = losses(killed, 1)
    assert sorted(resumed) == list(range(last_saved + 1, MAX_STEPS + 1)), killed_at
    assert resumed == {s: expected[s] for s in resumed}, killed_at
    # the same command: the same losses before the kill
    assert logged_before_kill == {s: expected[s] for s in logged_before_kill}, killed_at
    assert_checkpoints_load(killed)
    assert (killed / "final" / "lit_model.pth").is_file()


@pytest.mark.parametrize(
    "allocation, message, saved",
    [
        ("uniform", "error: non-finite loss in step 2 (micro-batch 3, here): stopping", [1]),
        ("sensitivity", "error: non-finite sensitivity in the pass after step 1", []),  # the pass runs before the save
    ],
    ids=["loss", "sensitivity-pass"],
)
def test_diverged_loss_stops_with_one_clear_line_and_intact_checkpoints(tmp_path, allocation, message, saved):
    sgd = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 1e30}}'
    code, out, err = finish(start(tmp_path, "--optimizer", sgd, "--dropbp.allocation", allocation,
                                  "--train.save_interval", "1", "--train.max_steps", "4"))
    assert code == 2
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(message), line
    assert saved_steps(tmp_path) == saved  # nothing saved from the diverged step on
    assert_checkpoints_load(tmp_path)
    assert not (tmp_path / "final").exists()


def test_same_command_twice_gives_the_same_loss_curve(tmp_path):
    def run(out_dir: Path) -> tuple:
        lora.setup(
            out_dir=out_dir, data=Builtin(num_samples=64), dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.25),
            train=TrainArgs(global_batch_size=4, micro_batch_size=2, lr_warmup_steps=1, max_steps=4, save_interval=None,
                            log_interval=1, min_lr=0.0, max_seq_length=64),
            eval=EvalArgs(interval=1000, final_validation=False),
        )
        with open(out_dir / "logs" / "csv" / "version_0" / "metrics.csv") as f:
            curve = {row["step"]: (row["loss"], row["drop_rate"]) for row in csv.DictReader(f) if row.get("loss")}
        return curve, (out_dir / "dropbp_allocation.json").read_text()

    first, second = run(tmp_path / "first"), run(tmp_path / "second")
    assert len(first[0]) == 4 and first == second
