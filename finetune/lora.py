"""LoRA fine-tuning with DropBP.  Example: python finetune/lora.py --dropbp.rate 0.875"""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from finetune import trainer
from finetune.checkpoint import save_weights
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.lora import GPT, Config, mark_only_lora_as_trainable, merge_lora_weights


def lora_config(checkpoint_dir: Path, r: int, alpha: int, dropout: float, targets: dict) -> Config:
    return Config.from_file(
        checkpoint_dir / "model_config.yaml", lora_r=r, lora_alpha=alpha, lora_dropout=dropout, **targets
    )


def finalize(fabric, model, checkpoint_dir: Path, final_dir: Path) -> None:
    """Save the LoRA weights (``lit_model.pth.lora``), then merge them into the *unquantized* base weights and
    save a plain litgpt ``lit_model.pth``, so litgpt's generate/chat/convert tools work on ``final/``."""
    lora_path = final_dir / "lit_model.pth.lora"
    save_weights(fabric, model, lora_path, keep=lambda name: "lora_" in name)
    if fabric.global_rank == 0:
        config = model.config
        with torch.device("meta"):
            merged = GPT(config)
        base = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
        lora = torch.load(lora_path, map_location="cpu", weights_only=True)
        merged.load_state_dict({**base.get("model", base), **lora}, strict=False, assign=True)
        merge_lora_weights(merged)
        # back to plain litgpt names: LoRALinear keeps the base weight under `.linear`
        state = {k.replace("linear.", ""): v for k, v in merged.state_dict().items() if "lora_" not in k}
        tmp = final_dir / "lit_model.pth.tmp"
        torch.save(state, tmp)
        tmp.replace(final_dir / "lit_model.pth")
    fabric.barrier()


def lora_method(name: str, r: int, alpha: int, dropout: float, targets: dict, **extra) -> trainer.Method:
    return trainer.Method(
        name=name,
        gpt_class=GPT,
        config=lambda d: lora_config(d, r, alpha, dropout, targets),
        mark_trainable=mark_only_lora_as_trainable,
        finalize=finalize,
        options={"lora_r": r, "lora_alpha": alpha, "lora_dropout": dropout, **targets, **extra},
        **extra,
    )


def setup(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Path = Path("out/finetune/lora"),
    precision: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = True,
    lora_value: bool = True,
    lora_projection: bool = True,
    lora_mlp: bool = True,
    lora_head: bool = False,
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
    """LoRA fine-tuning (the paper's setting: r=8, alpha=16 on every linear layer) with DropBP.

    Arguments:
        checkpoint_dir: litgpt checkpoint to fine-tune (default: the built-in tiny model and data).
        out_dir: where logs, checkpoints and ``final/`` (merged ``lit_model.pth``) go.
        precision: "32-true", "bf16-true", "bf16-mixed", ... (default: bf16-true on GPU, 32-true on CPU).
        devices: devices per node (several: DDP).
        num_nodes: number of nodes.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on the MLP.
        lora_head: LoRA on the output head.
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
    targets = dict(lora_query=lora_query, lora_key=lora_key, lora_value=lora_value, lora_projection=lora_projection,
                   lora_mlp=lora_mlp, lora_head=lora_head)
    method = lora_method("lora", lora_r, lora_alpha, lora_dropout, targets)
    options = trainer.Options(checkpoint_dir, out_dir, precision, devices, num_nodes, data, train, eval, dropbp, pld,
                              optimizer, logger_name, seed, resume, overwrite, compile)
    trainer.run(method, options)


if __name__ == "__main__":
    trainer.cli(setup)
