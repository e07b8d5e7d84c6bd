"""Faults: a run killed with SIGKILL or stopped by SIGTERM or Ctrl-C anywhere (a step, validation, the sample's
generation, the sensitivity pass, a save) resumes with `--resume auto` and logs the losses of an uninterrupted run;
evaluation never changes training; a diverged loss stops the run with one clear line; the same command twice gives
the same loss curve."""

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

from finetune import checkpoint, evaluation, lora, loop, sensitivity_pass, trainer
from finetune.args import DropBPArgs
from lit_gpt.data import Builtin
from tests.test_recipes import logged

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


def command(out_dir: Path, *extra: str) -> list:
    """The LoRA recipe's command line of these tests (argv: the script, then its options)."""
    return [str(ROOT / "finetune" / "lora.py"), *ARGS, "--out_dir", str(out_dir), *extra]


def start(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *command(out_dir, *extra)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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


def run_in_process(monkeypatch, out_dir: Path, *extra: str) -> None:
    """The command line of `start`, run in this process (no litgpt import to wait for): its errors end it as the
    CLI's one line and exit status (SystemExit)."""
    monkeypatch.setattr(sys, "argv", command(out_dir, *extra))
    trainer.cli(lora.setup)


# over 30 s: two recipe processes (the victims), each importing litgpt (~12 s), and three runs to the end: real
# signals need real processes
def test_sigkill_or_sigterm_then_resume_auto_gives_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """SIGKILL loses at most the steps since the last save; SIGTERM (a cluster's preemption) saves the last completed
    step first and exits with 143. Either way the resumed run logs the uninterrupted run's losses and ends with its
    weights. Each victim is stopped after a random number of saves plus a random part of a step (possibly in the
    middle of a save); the uninterrupted run and the resumes are the same command lines, run in this process."""
    victims = {sig: (tmp_path / sig.name, start(tmp_path / sig.name)) for sig in (signal.SIGKILL, signal.SIGTERM)}
    rng = random.Random()
    stopped = {}
    for sig, (out_dir, victim) in victims.items():
        saves, delay = rng.randint(1, 3), rng.uniform(0.0, 0.3)
        deadline = time.monotonic() + 180
        while len(saved_steps(out_dir)) < saves:
            assert victim.poll() is None, f"the run ended before {saves} saves: {victim.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        time.sleep(delay)
        victim.send_signal(sig)
        stopped[sig] = f"{sig.name} after {saves} saves + {delay:.2f}s"
    run_in_process(monkeypatch, tmp_path / "uninterrupted")
    expected = losses(tmp_path / "uninterrupted", 0)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    expected_weights = torch.load(tmp_path / "uninterrupted" / "final" / "lit_model.pth.lora", weights_only=True)

    for sig, (out_dir, victim) in victims.items():
        code, out, err = finish(victim)
        assert code == {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143}[sig], \
            f"{stopped[sig]}: the run finished before the signal, or failed: {err[-2000:]}"
        assert not (out_dir / "final").exists()
        assert_checkpoints_load(out_dir)
        last_saved = saved_steps(out_dir)[-1]
        logged_before = losses(out_dir, 0)
        if sig == signal.SIGKILL:  # a kill in the save of step N loses that save: at most SAVE_INTERVAL steps lost
            assert max(logged_before, default=0) - last_saved <= SAVE_INTERVAL, stopped[sig]
        else:  # nothing lost: the last logged step is saved
            assert err.strip().splitlines()[-1].startswith("terminated: ") and "Traceback" not in err
            assert max(logged_before) == last_saved, (stopped[sig], err[-2000:])
        capsys.readouterr()
        run_in_process(monkeypatch, out_dir, "--resume", "auto")  # resuming needs no signal: no new process
        out = capsys.readouterr().out
        assert f"Resumed from {out_dir / f'step-{last_saved:06d}' / 'training_state.pth'} at step {last_saved}" in out
        resumed = losses(out_dir, 1)
        assert sorted(resumed) == list(range(last_saved + 1, MAX_STEPS + 1)), stopped[sig]
        assert resumed == {s: expected[s] for s in resumed}, stopped[sig]
        assert logged_before == {s: expected[s] for s in logged_before}, stopped[sig]  # the same command
        weights = torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)
        assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights), stopped[sig]
        assert_checkpoints_load(out_dir)


@pytest.mark.parametrize(
    "allocation, message, saved",
    [
        ("uniform", "error: non-finite loss in step 2 (micro-batch 3, here): stopping", [1]),
        ("sensitivity", "error: non-finite sensitivity in the pass after step 1", []),  # the pass runs before the save
    ],
    ids=["loss", "sensitivity-pass"],
)
def test_diverged_loss_stops_with_one_clear_line_and_intact_checkpoints(tmp_path, monkeypatch, capsys, allocation,
                                                                        message, saved):
    sgd = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 1e30}}'
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, tmp_path, "--optimizer", sgd, "--dropbp.allocation", allocation,
                       "--train.save_interval", "1", "--train.max_steps", "4")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
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


# ------------------------------------------------------------- a stop anywhere in a step, in-process: exact resume
STOP_AT = 3  # the sensitivity pass runs after this step (0.5 of 6): every kind of after-step work happens here


def stop_run(out_dir: Path, **kwargs) -> None:
    lora.setup(
        out_dir=out_dir, data=Builtin(num_samples=64), dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.5),
        train=TrainArgs(global_batch_size=4, micro_batch_size=2, lr_warmup_steps=1, max_steps=6, save_interval=2,
                        log_interval=1, min_lr=0.0, max_seq_length=64),
        **{"eval": EvalArgs(interval=1, max_iters=2, max_new_tokens=4, final_validation=False), **kwargs},
    )


def outcome(out_dir: Path) -> tuple:
    """Every logged value by step (text, compared exactly; a resumed run's versions merged) and the trained tensors."""
    rows = {(step, key): row[key] for key in ("loss", "drop_rate", "val_loss")
            for step, row in logged(out_dir, key).items()}
    return rows, torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)


def same_outcome(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple:
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    stop_run(out_dir)
    return outcome(out_dir)


def test_evaluation_never_changes_training(tmp_path, uninterrupted):
    """Validation at every step with a sample generated, or never: the same losses and weights, bit for bit (the
    validation loader used to draw its seed from the training RNG)."""
    stop_run(tmp_path, eval=EvalArgs(interval=1000, max_new_tokens=0, final_validation=False))
    rows, weights = outcome(tmp_path)
    assert sorted(s for s, key in rows if key == "loss") == [1, 2, 3, 4, 5, 6]
    assert same_outcome(({k: v for k, v in uninterrupted[0].items() if k[1] != "val_loss"}, uninterrupted[1]),
                        (rows, weights))


def stop_in_validation(monkeypatch):
    calls = []

    def validating_then_stopped(*args, **kwargs):
        value = validate(*args, **kwargs)
        calls.append(value)
        if len(calls) == STOP_AT:
            raise KeyboardInterrupt
        return value

    validate = loop.validate
    monkeypatch.setattr(loop, "validate", validating_then_stopped)


def stop_in_generation(monkeypatch):
    generate, calls = evaluation.Example.generate, []

    def generating_then_stopped(self, fabric, model, write):
        calls.append(generate(self, fabric, model, write))
        if len(calls) == STOP_AT:
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluation.Example, "generate", generating_then_stopped)


def stop_in_sensitivity_pass(monkeypatch):
    compute = sensitivity_pass.compute_sensitivity

    def stopped_at_the_third_probe(handler, model, probe_loss, **kwargs):
        probes = []

        def counted():
            probes.append(1)
            if len(probes) == 3:
                raise KeyboardInterrupt
            return probe_loss()

        return compute(handler, model, counted, **kwargs)

    monkeypatch.setattr(sensitivity_pass, "compute_sensitivity", stopped_at_the_third_probe)


def sigterm_in_optimizer_step(monkeypatch):
    step = loop.optimizer_step

    def terminated_midway(run, kept):
        if run.progress["step"] == STOP_AT - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # held until the step and its bookkeeping are done
        return step(run, kept)

    monkeypatch.setattr(loop, "optimizer_step", terminated_midway)


def stop_in_a_save(monkeypatch):
    """Ctrl-C in the save of step 2, before its file is renamed into place: the stop's own save writes it whole."""
    replace, stops = checkpoint.os.replace, []

    def stopped_before_the_rename(src, dst):
        if str(dst).endswith(f"step-{STOP_AT - 1:06d}/training_state.pth") and not stops:
            stops.append(dst)
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", stopped_before_the_rename)


@pytest.mark.parametrize("stop", [stop_in_validation, stop_in_generation, stop_in_sensitivity_pass,
                                  sigterm_in_optimizer_step, stop_in_a_save], ids=lambda f: f.__name__)
def test_a_stop_anywhere_in_a_step_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, stop):
    """Ctrl-C in validation, in the sample's generation, in the sensitivity pass or in a save, or SIGTERM in an
    optimizer step:
    the step's weights are saved as that step (the work after it runs first on resume), and the resumed run logs the
    uninterrupted run's values and ends with its weights. Before, the weights after step N+1 were saved as step N."""
    saved_at = STOP_AT - 1 if stop is stop_in_a_save else STOP_AT
    with monkeypatch.context() as patches:
        stop(patches)
        with pytest.raises(trainer.Interrupted, match=f"step-{saved_at:06d}/training_state.pth holds step {saved_at}")\
                as stopped:
            stop_run(tmp_path)
    assert stopped.value.terminated == (stop is sigterm_in_optimizer_step)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it
    stop_run(tmp_path, resume="auto")
    resumed = outcome(tmp_path)
    assert sorted(s for s, key in resumed[0] if key == "loss") == [1, 2, 3, 4, 5, 6]
    assert same_outcome(resumed, uninterrupted)


def test_resume_refuses_a_checkpoint_missing_a_trainable_tensor(tmp_path):
    """Loading is not strict (a checkpoint holds only what trains): a missing tensor would silently stay at its
    pretrained value while the optimizer and the step count continue. Refused in one line."""
    stop_run(tmp_path, eval=EvalArgs(interval=1000, max_new_tokens=0, final_validation=False))
    path = tmp_path / "step-000002" / "training_state.pth"
    state = torch.load(path, weights_only=True)
    dropped = sorted(state["model"])[0]
    del state["model"][dropped]
    torch.save(state, path)
    with pytest.raises(trainer.UsageError) as refused:
        stop_run(tmp_path, resume=path)
    message = str(refused.value)
    assert f"lacks 1 of the model's trainable tensors (e.g. {dropped})" in message and "\n" not in message


TWO_PROCESS_ARGS = ["--devices", "2", "--train.save_interval", "1000", "--eval.interval", "1", "--eval.max_iters", "1",
                    "--eval.max_new_tokens", "0", "--dropbp.allocation", "uniform"]


def two_process_reference(out_dir: Path) -> None:
    """The uninterrupted two-process run of the test below: a case of the suite's two-process launch
    (tests/two_processes.py), the same command line as the victim's."""
    sys.argv = command(out_dir / "uninterrupted", *TWO_PROCESS_ARGS)
    trainer.cli(lora.setup)


# over 30 s: two two-process runs (the victim, the resume): a real signal to a real process group
def test_sigterm_to_every_rank_of_a_two_process_run_saves_one_step_and_resumes_exactly(tmp_path, two_processes):
    """SLURM and Kubernetes signal every process of a job. Several ranks cannot each save where the signal found
    them (a save is a collective): the signal is held until the ranks agree on it at the next log step, where all
    of them save that step and exit with 143. Nothing was saved before (no --train.save_interval step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    victim = subprocess.Popen([sys.executable, *command(tmp_path / "preempted", *TWO_PROCESS_ARGS)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: both ranks, as SLURM's
    lines = []
    for line in victim.stdout:  # rank 0's validation lines, as they come
        lines.append(line)
        if line.startswith("step 3: val loss"):
            os.killpg(victim.pid, signal.SIGTERM)
            break
    rest, err = victim.communicate(timeout=240)
    assert victim.returncode == 143, "".join(lines) + rest + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated: ") and "Traceback" not in err, err[-3000:]
    saved = saved_steps(tmp_path / "preempted")
    assert len(saved) == 1 and saved[0] >= 3 and f"step-{saved[0]:06d}/training_state.pth holds step" in last
    code, out, err = finish(start(tmp_path / "preempted", *TWO_PROCESS_ARGS, "--resume", "auto"))
    assert code == 0, err[-3000:]
    reference = two_processes / "sigterm_reference" / "uninterrupted"
    expected = losses(reference, 0)
    resumed = losses(tmp_path / "preempted", 1)
    assert sorted(resumed) == list(range(saved[0] + 1, MAX_STEPS + 1))
    assert resumed == {s: expected[s] for s in resumed}
    weights = [torch.load(run / "final" / "lit_model.pth.lora", weights_only=True)
               for run in (reference, tmp_path / "preempted")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_signals_wait_for_the_end_of_an_optimizer_step_and_several_ranks_hold_the_first():
    """One process: signals inside `deferred` (an optimizer step) stop the run at its end, a second one too. Several
    processes: the first signal is held for the ranks to agree on; a second stops at once, saving nothing."""
    from finetune import signals

    with signals.stop_signals():
        finished = False
        with pytest.raises(signals.Stopped) as stopped:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True
        assert finished and not stopped.value.terminated and stopped.value.together
    with signals.stop_signals(processes=2):
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.held() == signal.SIGTERM
        with pytest.raises(signals.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert not stopped.value.together
    assert signals.held() == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
