"""A run's --out_dir: the atomic claim (an OS lock held for the run's life, and a lease it refreshes), the recorded
options (``hyperparameters.yaml``, the recipe's --config format) and what resuming may not change."""

import math
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from litgpt.prompts import PromptStyle, prompt_styles

from finetune.cli import UsageError


LOCK = "run.lock"


LEASE = 120.0  # seconds a run.lock of another host stays valid without a refresh (DROPBP_LOCK_LEASE overrides it)


RECORD = "hyperparameters.yaml"  # litgpt's name: its tools (merge_lora) read the LoRA options from it


# options a resumed run may not change: every option of a group (None), or the ones listed (the schedule, which the
# learning rate and the data position follow)
RESUME_MUST_MATCH = {
    "method": None, "dropbp": None, "pld": None, "optimizer": None,
    "train": ("global_batch_size", "micro_batch_size", "max_steps", "epochs", "lr_warmup_steps", "lr_warmup_fraction",
              "min_lr", "max_seq_length"),
}


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
    """The options of `RESUME_MUST_MATCH` that differ between two run records, as ``group.key old -> new``."""
    changed = []
    for group, keys in RESUME_MUST_MATCH.items():
        old, new = saved.get(group), current.get(group)
        if not isinstance(new, dict):  # the optimizer: a name or a config
            changed += [f"{group} {old!r} -> {new!r}"] if old != new else []
            continue
        old = old if isinstance(old, dict) else {}
        changed += [f"{group}.{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys or new
                    if old.get(key) != new.get(key)]
    return changed


def check_resumed_options(saved: Optional[dict], current: dict, path: Path) -> None:
    """Resuming with other DropBP, PLD, method or optimizer options or another schedule would silently train with
    the saved ones, or restart the schedule: refuse."""
    if saved is None:  # a checkpoint from before options were recorded
        return
    changed = changed_options(saved, current)
    if changed:
        raise UsageError(f"--resume: {path} was trained with other options ({'; '.join(changed)}): resume with the"
                         " saved ones, or start a new run in another --out_dir")


def finished_run(out_dir: Path, current: dict) -> bool:
    """Whether ``out_dir`` holds a finished run: ``final/``'s record is written last. ``--resume auto`` then has
    nothing to do; with other options (a longer schedule included) it is refused, naming them."""
    path = out_dir / "final" / RECORD
    if not path.is_file():
        return False
    try:
        flat = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        flat = {}
    # final/'s record is in the recipe's --config form: the method's options at the top level
    method = {k: v for k, v in current.get("method", {}).items() if k != "name"}
    changed = changed_options({**flat, "method": {k: flat.get(k) for k in method}}, {**current, "method": method})
    if flat and changed:
        raise UsageError(f"--resume auto: {out_dir} holds a run finished with other options ({'; '.join(changed)}):"
                         " --overwrite true replaces it, or use another --out_dir")
    return True


@dataclass
class Claim:
    """A run's hold on its out_dir: an OS lock on ``run.lock``, held open for the run's life (the OS frees it when
    the process dies, however it dies), a daemon thread that refreshes the lease written in it (``flock`` may not
    reach other hosts of a shared file system; the lease does), and whether this run made the directory."""

    out_dir: Path
    created: bool
    lock_fd: int
    stop: threading.Event = field(default_factory=threading.Event, init=False)
    refresher: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.refresher = threading.Thread(target=self.refresh, args=(lease_seconds() / 4,), daemon=True,
                                          name=f"lease of {self.out_dir / LOCK}")
        self.refresher.start()

    def refresh(self, every: float) -> None:
        while not self.stop.wait(every):
            try:
                os.pwrite(self.lock_fd, lock_stamp(), 0)  # same length each time: no truncation a reader could see
            except OSError:  # a passing file-system error: the next tick tries again
                pass

    def release(self) -> None:
        """Stop refreshing and drop the lock; a directory this run made and never started training in (refused or
        failed in set-up: ``hyperparameters.yaml`` is written just before the first step) is removed rather than left
        empty."""
        self.stop.set()
        self.refresher.join()  # before the descriptor is closed: it could be reused by another file
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
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing), with this host, pid and time written in
    it: (the open descriptor, None), or (None, why not and how to take it over by hand). ``flock`` may not reach
    across the hosts of a shared file system, so a lock naming another host is respected while its lease lasts
    (`Claim` refreshes it); an expired one is taken over with a warning."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            who = f"pid {holder[1]} on {holder[0]}" if holder else "another process"
            return None, f"{path.parent} is in use by a running run ({who}): if that run is gone, delete {path}"
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder released and removed it between our open and our lock
            same_file = False
        if same_file:
            break
        os.close(fd)
    holder = lock_holder(fd)
    if holder and holder[0] != socket.gethostname():  # on this host, the free flock says its run is gone
        age, lease = time.time() - holder[2], lease_seconds()
        if age < lease:
            os.close(fd)
            return None, (f"{path.parent} is in use by a running run (pid {holder[1]} on {holder[0]}): if that run"
                          f" is gone, delete {path}, or wait {math.ceil(lease - age)}s for its lease to expire")
        print(f"warning: taking over {path} from pid {holder[1]} on {holder[0]}: its lease expired (last refreshed"
              f" {age:.0f}s ago)", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, lock_stamp(), 0)
    return fd, None


def lock_holder(fd: int) -> Optional[tuple[str, str, float]]:
    """(host, pid, unix time of its last refresh) written in a lock file, or None when it names no one."""
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    if len(words) < 2:
        return None
    try:
        return words[0], words[1], float(words[2])
    except (IndexError, ValueError):  # the old "host pid" form has no time: the file's mtime stands in
        return words[0], words[1], os.fstat(fd).st_mtime


def lock_stamp() -> bytes:
    return f"{socket.gethostname()} {os.getpid()} {time.time():.3f}".encode()


def lease_seconds() -> float:
    return float(os.environ.get("DROPBP_LOCK_LEASE", LEASE))
