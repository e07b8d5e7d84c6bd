"""A run's --out_dir: the atomic claim (an OS lock held for the run's life), the recorded options
(``hyperparameters.yaml``, the recipe's --config format) and what resuming may not change."""

import os
import shutil
import socket
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from litgpt.prompts import PromptStyle, prompt_styles

from finetune.cli import UsageError


LOCK = "run.lock"


RECORD = "hyperparameters.yaml"  # litgpt's name: its tools (merge_lora) read the LoRA options from it


RESUME_MUST_MATCH = ("method", "dropbp", "pld")  # options a resumed run may not change


def run_record(method, opts) -> dict:
    """The options of a run (``method``: the recipe's `trainer.Method`; ``opts``: its `trainer.Options`), as a
    recipe's ``--config`` file (``python finetune/lora.py --config out/.../hyperparameters.yaml`` repeats it) plus the
    method's name."""
    data = opts.data
    data_args = {f.name: getattr(data, f.name) for f in fields(data) if f.init} if is_dataclass(data) else {}
    record = {
        "method": {"name": method.name, **method.options},
        "checkpoint_dir": str(opts.checkpoint_dir), "out_dir": str(opts.out_dir), "precision": opts.precision,
        "devices": opts.devices, "num_nodes": opts.num_nodes,
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", "init_args": data_args},
        "train": asdict(opts.train), "eval": asdict(opts.eval), "dropbp": asdict(opts.dropbp), "pld": asdict(opts.pld),
        "optimizer": opts.optimizer, "logger_name": opts.logger_name, "seed": opts.seed, "compile": opts.compile,
    }
    return plain(record)


def plain(value):
    """YAML-safe copy: paths and prompt styles as strings."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PromptStyle):
        return next((name for name, cls in prompt_styles.items() if type(value) is cls), type(value).__name__)
    return str(value)


def write_record(record: dict, folder: Path) -> None:
    """``hyperparameters.yaml`` (the recipe's options; the method's under ``method``)."""
    options = {k: v for k, v in record.items() if k != "method"}
    options.update({k: v for k, v in record.get("method", {}).items() if k != "name"})
    atomic_write_text(folder / RECORD, yaml.safe_dump(options, sort_keys=False))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def changed_options(saved: dict, current: dict) -> list:
    """The DropBP, PLD and method options that differ between two run records, as ``group.key old -> new``."""
    return [
        f"{group}.{key} {saved.get(group, {}).get(key)!r} -> {value!r}"
        for group in RESUME_MUST_MATCH for key, value in current.get(group, {}).items()
        if saved.get(group, {}).get(key) != value
    ]


def check_resumed_options(saved: Optional[dict], current: dict, path: Path) -> None:
    """Resuming with other DropBP, PLD or method options would silently train with the saved ones: refuse."""
    if saved is None:  # a checkpoint from before options were recorded
        return
    changed = changed_options(saved, current)
    if changed:
        raise UsageError(f"--resume: {path} was trained with other options ({'; '.join(changed)}): resume with the"
                         " saved ones, or start a new run in another --out_dir")


def finished_run_refusal(out_dir: Path, current: dict) -> str:
    """Why ``--resume auto`` may not start an out_dir that holds ``final/`` but no checkpoint anew: it would replace
    a finished run (naming the options that differ from the ones it was trained with)."""
    try:
        flat = yaml.safe_load((out_dir / "final" / RECORD).read_text()) or {}
    except (OSError, yaml.YAMLError):
        flat = {}
    # final/'s record is in the recipe's --config form: the method's options at the top level
    saved = {"dropbp": flat.get("dropbp", {}), "pld": flat.get("pld", {}),
             "method": {k: flat.get(k) for k in current.get("method", {}) if k != "name"}}
    changed = changed_options(saved, {**current, "method": {k: v for k, v in current.get("method", {}).items()
                                                            if k != "name"}})
    other = f"; it was trained with other options ({'; '.join(changed)})" if flat and changed else ""
    return (f"--resume auto: {out_dir} holds a finished run (final/) and no step-* checkpoint to continue{other}:"
            " --overwrite true replaces it, or use another --out_dir")


@dataclass
class Claim:
    """A run's hold on its out_dir: an OS lock on ``run.lock``, held open for the run's life (the OS frees it when
    the process dies, however it dies), and whether this run made the directory."""

    out_dir: Path
    created: bool
    lock_fd: int

    def release(self) -> None:
        """Drop the lock; a directory this run made and never started training in (refused or failed in set-up:
        ``hyperparameters.yaml`` is written just before the first step) is removed rather than left empty."""
        if self.created and not (self.out_dir / RECORD).exists():
            shutil.rmtree(self.out_dir, ignore_errors=True)  # the lock file with it, while still held
        else:
            (self.out_dir / LOCK).unlink(missing_ok=True)
        os.close(self.lock_fd)


def claim_out_dir(out_dir: Path, resume, overwrite: bool) -> tuple[Optional[str], Optional[Claim]]:
    """Take ``out_dir`` for this run, or say why not (one line). The lock is taken atomically (an exclusive
    ``flock``), so of two runs started at once into one directory exactly one gets it. A finished or checkpointed
    run is kept unless ``--resume`` continues it or ``--overwrite true`` replaces it."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_fd, problem = take_lock(out_dir / LOCK)
    previous = [p.name for p in sorted(out_dir.glob("step-*")) + [out_dir / "final"] if p.exists()]
    if problem is None and previous and resume in (False, "false", "False", None) and not overwrite:
        problem = (f"{out_dir} already holds a run ({', '.join(previous[-3:])}): pass --resume auto to continue it,"
                   " --overwrite true to replace it, or another --out_dir")
    if problem is not None:
        if lock_fd is not None:  # without the lock, the directory is another run's: never touch it
            Claim(out_dir, created, lock_fd).release()
        return problem, None
    if previous and resume in (False, "false", "False", None):  # --overwrite true
        for name in previous + ["logs", "dropbp_allocation.json", "dropbp_allocation.png", RECORD]:
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return None, Claim(out_dir, created, lock_fd)


def take_lock(path: Path) -> tuple[Optional[int], Optional[str]]:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing), with this host and pid written in it:
    (the open descriptor, None), or (None, why not). A lock file naming another host is respected too: ``flock``
    may not reach across the hosts of a shared file system."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[1]} on {owner[0]}" if len(owner) == 2 else "another process"
            return None, f"{path.parent} is in use by a running run ({who}; {path})"
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder released and removed it between our open and our lock
            same_file = False
        if same_file:
            break
        os.close(fd)
    owner = os.read(fd, 256).decode(errors="replace").split()
    if len(owner) == 2 and owner[0] != socket.gethostname():
        os.close(fd)
        return None, f"{path.parent} is in use by a running run (pid {owner[1]} on {owner[0]}; {path})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
    return fd, None
