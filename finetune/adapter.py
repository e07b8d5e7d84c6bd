"""Adapter (v2) fine-tuning with DropBP.  Example: python finetune/adapter.py --dropbp.rate 0.875"""

import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from finetune import trainer
from finetune.checkpoint import save_weights, trainable_names
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.adapter_v2 import GPT, Config, mark_only_adapter_v2_as_trainable

FICLONE = 0x40049409  # Linux's ioctl that clones a file's extents (<linux/fs.h>)


def finalize(fabric, model, checkpoint_dir: Path, final_dir: Path) -> None:
    """Like litgpt, the adapter weights alone (``lit_model.pth.adapter_v2``), plus a copy of the base weights beside
    them (``lit_model.pth``), so that ``final/`` is complete on its own:
    ``litgpt generate_adapter_v2 final --adapter_path final/lit_model.pth.adapter_v2`` and
    ``eval/evaluate.py --checkpoint_dir final`` work on it."""
    trainable = trainable_names(model)
    save_weights(fabric, model, final_dir / "lit_model.pth.adapter_v2", keep=lambda name: name in trainable)
    if fabric.global_rank == 0:
        copy_file(checkpoint_dir / "lit_model.pth", final_dir / "lit_model.pth")
    fabric.barrier()


def copy_file(source: Path, target: Path) -> None:
    """A file of its own, never a link: a later write to a hard link (``torch.save`` truncates the file in place)
    would destroy the base checkpoint. A copy-on-write clone where the file system has them (btrfs, XFS: instant,
    no space), else a copy; written under a temporary name and renamed, so a kill leaves no torn file."""
    tmp = target.with_name(target.name + ".tmp")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:
            shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)


def setup(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Path = Path("out/finetune/adapter-v2"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    data: Optional[DataModule] = None,
    train: TrainArgs = trainer.default_train_args(),
    eval: EvalArgs = trainer.default_eval_args(),
    dropbp: DropBPArgs = DropBPArgs(),
    pld: PLDArgs = PLDArgs(),
    optimizer: Union[str, dict] = "AdamW",
    logger_name: Literal["csv", "tensorboard"] = "csv",
    seed: int = 1337,
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
    compile: bool = False,
) -> None:
    """Adapter v2 fine-tuning with DropBP.

    Arguments:
        checkpoint_dir: litgpt checkpoint to fine-tune (default: the built-in tiny model and data).
        out_dir: where logs, checkpoints and ``final/lit_model.pth.adapter_v2`` go.
        precision: "32-true", "bf16-true", "bf16-mixed", ... (default: bf16-true on GPU, 32-true on CPU).
        devices: devices per node (several: DDP).
        num_nodes: number of nodes.
        data: Alpaca, Dolly, JSON or Builtin (default: Builtin with the built-in model, else Alpaca).
        train: training arguments, as litgpt's.
        eval: evaluation arguments, as litgpt's.
        dropbp: DropBP arguments.
        pld: Progressive Layer Dropping baseline arguments.
        optimizer: optimizer name or config (as litgpt's).
        logger_name: csv or tensorboard.
        seed: seed of data order, initialisation and dropout.
        resume: continue from the latest checkpoint in out_dir ("auto") or from a given one.
        overwrite: replace a run already in out_dir (otherwise refused, so that no run is lost).
        compile: torch.compile each block's attention and MLP branch (one device; the first steps compile).
    """
    method = trainer.Method(
        name="adapter_v2",
        gpt_class=GPT,
        config=lambda d: Config.from_file(d / "model_config.yaml"),
        mark_trainable=mark_only_adapter_v2_as_trainable,
        finalize=finalize,
    )
    options = trainer.Options(checkpoint_dir, out_dir, precision, devices, num_nodes, data, train, eval, dropbp, pld,
                              optimizer, logger_name, seed, resume, overwrite, compile)
    trainer.run(method, options)


if __name__ == "__main__":
    trainer.cli(setup)
