"""Training checkpoints (``step-*/training_state.pth``: what --resume needs, written atomically), finding the one to
resume from (read as tensors and plain values only), and the weights files of ``final/``."""

import os
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from finetune.cli import UsageError
from finetune.out_dir import write_record


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(handler, pld_handler, progress) -> dict:
    """What `--resume` needs besides the model and optimizer, as of now (the end of a completed step)."""
    return {"progress": dict(progress), "dropbp": handler.state_dict(),
            "pld": pld_handler.state_dict() if pld_handler is not None else None, "rng": get_rng_state()}


def save_training_state(fabric, model, optimizer, state: dict, record: dict, out_dir: Path) -> Path:
    """Everything `--resume` needs, written to a temporary name and renamed, so a kill never leaves a torn file;
    the run's options beside it (``hyperparameters.yaml``) and inside it (resuming with other options is refused)."""
    path = out_dir / f"step-{state['progress']['step']:06d}" / "training_state.pth"
    tmp = path.with_name(path.name + ".tmp")
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_record(record, path.parent)
    fabric.barrier()
    if fabric.world_size > 1:  # each rank's own RNG states: its dropout drew as many numbers as its batches held
        own = rank_rng_path(path, fabric.global_rank)
        torch.save(state["rng"], own.with_name(own.name + ".tmp"))
        os.replace(own.with_name(own.name + ".tmp"), own)
    trainable = trainable_names(model)
    fabric.save(tmp, {"model": model, "optimizer": optimizer, "record": record, **state},
                filter={"model": lambda name, _: name in trainable})
    if fabric.global_rank == 0:
        os.replace(tmp, path)
    fabric.barrier()
    return path


def rank_rng_path(path: Path, rank: int) -> Path:
    return path.with_name(f"rng-rank{rank}.pth")


def restored_rng(fabric, path: Path, saved: dict) -> dict:
    """This rank's RNG states as saved with the checkpoint at ``path`` (``saved``: rank 0's, inside it; the only
    ones of a single process, or of a rank the run did not have)."""
    own = rank_rng_path(path, fabric.global_rank)
    return torch.load(own, weights_only=True) if fabric.world_size > 1 and own.is_file() else saved


def save_on_interrupt(fabric, model, optimizer, state: dict, record: dict, out_dir: Path, together: bool) -> str:
    """Ctrl-C or SIGTERM: save the last completed step, when every process stopped at the same point (``together``:
    one process, or several that agreed on the signal; otherwise a collective save could hang), and say how to
    continue."""
    step = state["progress"]["step"]
    saved = out_dir / f"step-{step:06d}" / "training_state.pth"
    if together and step > 0 and not saved.is_file():
        saved = save_training_state(fabric, model, optimizer, state, record, out_dir)
    if saved.is_file():
        return f"{saved} holds step {step}; continue with --resume auto"
    return "nothing saved yet" if step == 0 else f"steps since the last checkpoint are lost (step {step})"


def find_resume_path(out_dir: Path, resume: bool | str | Path, warn: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint to resume from. ``auto``: the latest that loads; a torn or corrupt one is skipped with a
    warning (the previous intact one is used), and an out_dir with none starts from scratch, said so, unless it holds
    a ``final/`` (finished runs are found before: `out_dir.finished_run`), which is never replaced. Checkpoints are
    read as tensors and plain values only (``weights_only``): unpickling an arbitrary file could run any code."""
    if resume is False or resume in ("false", "False", None):
        return None
    if resume is True or resume == "auto":
        for path in sorted(out_dir.glob("step-*/training_state.pth"), reverse=True):
            problem = unreadable(path)
            if problem is None:
                return path
            warn(f"warning: {path} cannot be read ({problem}); trying the previous checkpoint")
        if (out_dir / "final").exists():  # killed while writing final/, with nothing saved before
            raise UsageError(f"--resume auto: {out_dir} holds an incomplete final/ and no step-* checkpoint to"
                             " continue: --overwrite true replaces it, or use another --out_dir")
        warn(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
        return None
    path = Path(resume).expanduser().resolve()
    if path.is_dir():
        path = path / "training_state.pth"
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no training_state.pth there")
    problem = unreadable(path)
    if problem is not None:
        raise UsageError(f"--resume {resume}: {path} cannot be read as a training state ({problem})")
    return path


def unreadable(path: Path) -> Optional[str]:
    """Why ``path`` does not load as tensors and plain values (a torn zip, a truncated file, a pickle of other
    objects), or None. Every checkpoint is probed so before Fabric loads it (under FSDP, with a full unpickler)."""
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        return type(e).__name__
    return None


def load_checkpoint_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} cannot be read as a litgpt checkpoint ({type(e).__name__}): re-download or"
                         " re-convert it") from None


# inserted into parameter names by FSDP and its activation checkpointing, absent from the state dicts it saves
FSDP_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def trainable_names(model) -> set:
    """Names of the trainable parameters as they appear in the saved state dict (without Fabric's or FSDP's
    wrappers)."""
    names = set()
    for name, p in getattr(model, "module", model).named_parameters():
        if p.requires_grad:
            for wrapper in FSDP_WRAPPERS:
                name = name.replace(wrapper, "")
            names.add(name)
    return names


def check_complete(path: Path, model) -> None:
    """Refuse a checkpoint that lacks a trainable tensor: loading it (not strictly: it holds only what trains)
    would silently leave that tensor at its pretrained value while the optimizer and step count continue."""
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["model"]
    missing = sorted(trainable_names(model) - saved.keys())
    if missing:
        raise UsageError(f"--resume: {path} lacks {len(missing)} of the model's trainable tensors (e.g. {missing[0]}):"
                         " it cannot continue this run; resume from another checkpoint or start anew")


def save_weights(fabric, model, path: Path, keep: Callable[[str], bool] = lambda name: True) -> None:
    """Write a state dict (keys filtered by ``keep``) atomically, as litgpt's tools expect: a plain state dict."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, {"model": model}, filter={"model": lambda name, _: keep(name)})
    if fabric.global_rank == 0:
        state = torch.load(tmp, weights_only=True)["model"]
        torch.save(state, tmp)
        os.replace(tmp, path)
    fabric.barrier()
