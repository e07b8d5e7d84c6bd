"""What a user hits around a run: a used out_dir, a running run, resuming with other options or from a corrupt
checkpoint, Ctrl-C, the recorded options, choice options and --help."""

import os
import shutil
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import capture_parser

from finetune import cli, loop, lora, trainer
from finetune import out_dir as outdir
from finetune.args import DropBPArgs
from tests.test_recipes import fast, logged, run_cli


def test_a_used_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DROPBP_LOCK_LEASE", raising=False)
    lora.setup(**fast(tmp_path, max_steps=2))
    first = (tmp_path / "final" / "lit_model.pth").read_bytes()
    with pytest.raises(trainer.UsageError, match="already holds a run .*--resume auto.*--overwrite true"):
        lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5))
    assert (tmp_path / "final" / "lit_model.pth").read_bytes() == first  # untouched
    assert not (tmp_path / outdir.LOCK).exists()  # released after the refusal and after the run

    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5), overwrite=True)
    assert sorted(logged(tmp_path)) == [1, 2] and len(list(tmp_path.glob("logs/csv/version_*"))) == 1

    held, _ = outdir.take_lock(tmp_path / outdir.LOCK)  # a running run holds the OS lock
    with pytest.raises(trainer.UsageError, match=f"is in use by a running run \\(pid {os.getpid()} on"):
        lora.setup(**fast(tmp_path, max_steps=2), overwrite=True)
    os.close(held)  # killed: the OS frees its lock, the file stays behind, stale
    assert (tmp_path / outdir.LOCK).exists()
    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.5), resume="auto")
    lock = tmp_path / outdir.LOCK
    lock.write_text(f"another-host 12345 {time.time():.3f}")  # a live run on another host of a shared file system
    with pytest.raises(trainer.UsageError, match=re.escape(
            f"in use by a running run (pid 12345 on another-host): if that run is gone, delete {lock}, or wait ")
            + r"(1[01]\d|120)s for its lease to expire$"):
        lora.setup(**fast(tmp_path, max_steps=2), overwrite=True)
    lock.write_text(f"another-host 12345 {time.time() - 600:.3f}")  # preempted there ten minutes ago
    capsys.readouterr()
    lora.setup(**fast(tmp_path, max_steps=2), overwrite=True)  # restarted here: takes it over, with one warning
    warnings = [line for line in capsys.readouterr().err.splitlines() if str(lock) in line]
    assert len(warnings) == 1 and re.fullmatch(re.escape(f"warning: taking over {lock} from pid 12345 on another-host:"
                                                         " its lease expired (last refreshed ") + r"60\ds ago\)",
                                               warnings[0])
    assert sorted(logged(tmp_path)) == [1, 2] and not lock.exists()


def test_a_running_claim_refreshes_its_lease_and_an_old_format_lock_expires_by_its_mtime(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("DROPBP_LOCK_LEASE", "60")
    lock = tmp_path / outdir.LOCK
    lock.write_text("other-node 4242")  # the old "host pid" form: its mtime is the last refresh
    problem, claim = outdir.claim_out_dir(tmp_path, resume=False, overwrite=False)
    assert claim is None and re.search(f"delete {re.escape(str(lock))}, or wait [56]\\ds for its lease to expire$",
                                       problem)
    monkeypatch.setenv("DROPBP_LOCK_LEASE", "0.4")
    os.utime(lock, (time.time() - 1, time.time() - 1))
    problem, claim = outdir.claim_out_dir(tmp_path, resume=False, overwrite=False)
    assert problem is None and capsys.readouterr().err.count("warning: taking over") == 1
    stamps = []
    for _ in range(3):
        time.sleep(0.3)
        host, pid, refreshed = lock.read_text().split()
        stamps.append(float(refreshed))
    assert pid == str(os.getpid()) and stamps == sorted(stamps) and stamps[0] < stamps[-1]  # refreshed while held
    problem, other = outdir.claim_out_dir(tmp_path, resume=False, overwrite=False)  # its flock is held too
    assert other is None and problem.endswith(f"if that run is gone, delete {lock}")
    claim.release()
    assert not claim.refresher.is_alive() and not any(t.name.startswith("lease of") for t in threading.enumerate())


def test_two_runs_started_at_once_into_one_out_dir_cannot_both_take_it(tmp_path):
    """The claim is atomic: checking for a lock and then writing it let both of two simultaneous runs in."""
    out_dir = tmp_path / "new"
    claims = []
    barrier = threading.Barrier(8)

    def start():
        barrier.wait()
        claims.append(outdir.claim_out_dir(out_dir, resume=False, overwrite=False))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [claim for problem, claim in claims if claim is not None]
    assert len(winners) == 1
    assert all("is in use by a running run" in problem for problem, claim in claims if claim is None)
    (out_dir / outdir.RECORD).write_text("{}")  # the run started: its directory stays after it ends
    winners[0].release()
    assert out_dir.is_dir() and not (out_dir / outdir.LOCK).exists()
    problem, claim = outdir.claim_out_dir(out_dir, resume=False, overwrite=False)
    assert problem is None
    claim.release()


def test_a_run_refused_or_failed_before_training_leaves_no_empty_out_dir(tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    assert "--eval.evaluate_example must be first, random or an index below" in run_cli(
        lora, ["--eval.evaluate_example", "1000", "--out_dir", str(out)], monkeypatch, capsys)
    assert not out.exists()
    nested = tmp_path / "a" / "b"

    def failing_validation(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(trainer, "validate", failing_validation)
    with pytest.raises(RuntimeError, match="broken"):
        lora.setup(**fast(nested))
    assert not nested.exists() and (tmp_path / "a").is_dir()  # only what the run made is removed
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(RuntimeError, match="broken"):
        lora.setup(**fast(kept))
    assert kept.is_dir()  # the user's own (empty) directory stays


def test_resume_auto_on_a_finished_run_touches_nothing_and_a_changed_schedule_is_refused(tmp_path, capsys):
    """A finished run (final/ complete, with or without step checkpoints; a preempted job restarted too late):
    --resume auto says so and touches nothing. With other options, a longer schedule included, it is refused in one
    line naming them; so is an unfinished run resumed with another schedule. Before, the finished run was trained
    again from its last checkpoint ("this run learned nothing") and final/ rewritten, and a raised
    --train.max_steps silently restarted the schedule."""
    for name, save_interval in (("no-checkpoint", 100), ("checkpointed", 1)):
        out = tmp_path / name
        lora.setup(**fast(out, max_steps=2, save_interval=save_interval), dropbp=DropBPArgs(rate=0.875))
        final = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (out / "final").iterdir()}
        capsys.readouterr()
        lora.setup(**fast(out, max_steps=2, save_interval=save_interval), dropbp=DropBPArgs(rate=0.875), resume="auto")
        printed = capsys.readouterr().out
        assert f"--resume auto: {out} holds a finished run (final/): nothing to do" in printed
        assert "learned nothing" not in printed and "Resumed" not in printed
        assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (out / "final").iterdir()} == final
        assert len(list(out.glob("logs/csv/version_*"))) == 1 and not (out / outdir.LOCK).exists()
        with pytest.raises(trainer.UsageError) as refused:
            lora.setup(**fast(out, max_steps=4, save_interval=save_interval),
                       dropbp=DropBPArgs(rate=0.5, sampling="fixed"), resume="auto")
        message = str(refused.value)
        assert "holds a run finished with other options" in message and "\n" not in message
        assert "dropbp.rate 0.875 -> 0.5; dropbp.sampling 'bernoulli' -> 'fixed'; train.max_steps 2 -> 4" in message
        assert "--overwrite true" in message
        assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (out / "final").iterdir()} == final

    unfinished = tmp_path / "checkpointed"
    shutil.rmtree(unfinished / "final")  # killed after its last save
    with pytest.raises(trainer.UsageError, match="other options \\(train.max_steps 2 -> 4\\)"):
        lora.setup(**fast(unfinished, max_steps=4, save_interval=1), dropbp=DropBPArgs(rate=0.875), resume="auto")
    torn = tmp_path / "no-checkpoint"
    (torn / "final" / outdir.RECORD).unlink()  # killed while writing final/, nothing saved before
    with pytest.raises(trainer.UsageError, match="holds an incomplete final/ and no step-\\* checkpoint"):
        lora.setup(**fast(torn, max_steps=2, save_interval=100), dropbp=DropBPArgs(rate=0.875), resume="auto")


def test_resume_reads_checkpoints_as_weights_only(tmp_path, capsys):
    """A training_state.pth whose pickle would run code is never unpickled: skipped by --resume auto, refused when
    named."""
    lora.setup(**fast(tmp_path, max_steps=3, save_interval=2))
    shutil.rmtree(tmp_path / "final")  # as if killed after the save of step 2

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).touch()",))

    rogue = tmp_path / "step-000009" / "training_state.pth"
    rogue.parent.mkdir()
    torch.save({"progress": RunsCode()}, rogue)
    lora.setup(**fast(tmp_path, max_steps=3, save_interval=2), resume="auto")
    out = capsys.readouterr().out
    assert f"warning: {rogue} cannot be read (UnpicklingError)" in out and "step-000002" in out
    with pytest.raises(trainer.UsageError, match="cannot be read as a training state \\(UnpicklingError\\)"):
        lora.setup(**fast(tmp_path, max_steps=3, save_interval=2), resume=rogue.parent)
    assert not marker.exists()


def test_options_are_recorded_and_resume_with_other_options_is_refused(tmp_path, capsys):
    lora.setup(**fast(tmp_path, max_steps=2), dropbp=DropBPArgs(rate=0.875), lora_r=4)
    for folder in ("step-000002", "final"):
        record = yaml.safe_load((tmp_path / folder / outdir.RECORD).read_text())
        assert record["dropbp"]["rate"] == 0.875 and record["lora_r"] == 4 and record["train"]["max_steps"] == 2
    # the record is a --config file of the recipe
    parser = capture_parser(lambda: cli.CLI(lora.setup, args=[]))
    parsed = parser.parse_args(["--config", str(tmp_path / "final" / outdir.RECORD)])
    assert parsed.dropbp.rate == 0.875 and parsed.lora_r == 4

    with pytest.raises(trainer.UsageError, match=r"dropbp.rate 0.875 -> 0.5; dropbp.sampling 'bernoulli' -> 'fixed'"):
        lora.setup(**fast(tmp_path, max_steps=4), dropbp=DropBPArgs(rate=0.5, sampling="fixed"), lora_r=4,
                   resume="auto")
    with pytest.raises(trainer.UsageError, match=r"other options \(train.max_steps 2 -> 3\)"):  # the schedule too
        lora.setup(**fast(tmp_path, max_steps=3), dropbp=DropBPArgs(rate=0.875), lora_r=4, resume="auto")

    empty = tmp_path / "empty"
    lora.setup(**fast(empty, max_steps=1), resume="auto")
    assert f"--resume auto: no checkpoint in {empty}, starting from scratch" in capsys.readouterr().out


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    lora.setup(**fast(tmp_path, max_steps=5))  # saves steps 2 and 4
    shutil.rmtree(tmp_path / "final")  # as if killed in step 5
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
    args = ["--checkpoint_dir", str(corrupt), "--data", "Builtin", *out]
    assert "cannot be read as a litgpt checkpoint" in run_cli(lora, args, monkeypatch, capsys)
    for argv, message in [
        (["--dropbp.allocation", "foo"], "--dropbp.allocation must be one of sensitivity, uniform, got 'foo'"),
        (["--dropbp.sampling=every"], "--dropbp.sampling must be one of bernoulli, fixed, got 'every'"),
        (["--logger_name", "wandb"], "--logger_name must be one of csv, tensorboard, got 'wandb'"),
    ]:
        assert run_cli(lora, [*argv, *out], monkeypatch, capsys) == f"error: {message}"

    save = loop.save_training_state

    def interrupted(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_training_state", interrupted)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--train.max_steps", "3", "--train.save_interval", "2",
                                      "--train.global_batch_size", "4", "--train.micro_batch_size", "2", *out])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: ")

    def broken_step(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(torch.optim.AdamW, "step", broken_step)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--out_dir", str(tmp_path / "other"), "--train.max_steps", "2"])
    with pytest.raises(SystemExit) as exit_info:
        trainer.cli(lora.setup)
    assert exit_info.value.code == cli.EXIT_FAILED
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


def test_make_demo_runs_again(tmp_path, monkeypatch, capsys):
    """`make demo` twice: its own command line (read from the Makefile, shortened to 2 steps and 2 validation
    batches, into a temporary out_dir) must not refuse the second run."""
    line = next(row for row in (Path(__file__).parents[1] / "Makefile").read_text().splitlines()
                if "finetune/lora.py" in row and row.startswith("\t"))
    argv = line.split("finetune/lora.py", 1)[1].split()
    argv[argv.index("--out_dir") + 1] = str(tmp_path / "demo")
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", ["lora.py", *argv, "--train.max_steps", "2", "--eval.max_new_tokens", "0",
                                          "--eval.max_iters", "2"])
        trainer.cli(lora.setup)
    assert sorted(logged(tmp_path / "demo")) == [1, 2] and (tmp_path / "demo" / "final" / "lit_model.pth").is_file()
