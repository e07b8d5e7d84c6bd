"""Full fine-tuning with DropBP.  Example: python finetune/full.py --dropbp.rate 0.875"""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import DataModule

from finetune import trainer
from finetune.checkpoint import save_weights
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.model import GPT


def finalize(fabric, model, checkpoint_dir: Path, final_dir: Path) -> None:
    save_weights(fabric, model, final_dir / "lit_model.pth")


def setup(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Path = Path("out/finetune/full"),
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
    """Full fine-tuning: every parameter trains; DropBP drops backward through residual branches.

    Arguments:
        checkpoint_dir: litgpt checkpoint to fine-tune (default: the built-in tiny model and data).
        out_dir: where logs, checkpoints and ``final/`` go.
        precision: "32-true", "bf16-true", "bf16-mixed", ... (default: bf16-true on GPU, 32-true on CPU).
        devices: devices per node (several: FSDP on GPUs, DDP on a CPU).
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
        name="full",
        gpt_class=GPT,
        config=lambda d: Config.from_file(d / "model_config.yaml"),
        mark_trainable=lambda model: None,
        finalize=finalize,
        full=True,
    )
    options = trainer.Options(checkpoint_dir, out_dir, precision, devices, num_nodes, data, train, eval, dropbp, pld,
                              optimizer, logger_name, seed, resume, overwrite, compile)
    trainer.run(method, options)


if __name__ == "__main__":
    trainer.cli(setup)
