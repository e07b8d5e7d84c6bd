"""QLoRA fine-tuning with DropBP: LoRA on a 4-bit (bitsandbytes) frozen base model.

On GPU the base is quantized by Lightning's bitsandbytes precision plugin (litgpt's `--quantize` path). Lightning
refuses that plugin on CPU, so there the frozen linear layers are replaced by bitsandbytes' own `Linear4bit`
directly (quantized when moved to the CPU).  Example: python finetune/qlora.py --dropbp.rate 0.875
"""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from finetune import trainer
from finetune.args import DropBPArgs, PLDArgs
from finetune.lora import lora_method

CPU_BLOCK = 64
QUANT_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}


def quantize_frozen_linears(
    model: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: str = "cpu"
) -> torch.nn.Module:
    """Replace every frozen ``nn.Linear`` by a bitsandbytes ``Linear4bit`` holding the same weights, quantized when
    moved to ``device`` (the CPU path of the recipe; the benchmark uses it on GPU too)."""
    import bitsandbytes as bnb

    quant_type, double_quant = mode.split("-")[0], mode.endswith("-dq")
    skipped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.requires_grad:
                continue
            if device == "cpu" and child.in_features % CPU_BLOCK:  # bitsandbytes' CPU kernels need whole 64-wide blocks per row
                skipped += 1
                continue
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=double_quant, quant_type=quant_type, device="cpu",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.to(compute_dtype), requires_grad=False, compress_statistics=double_quant,
                quant_type=quant_type,
            )
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, q.to(device))  # moving to a device quantizes the weight
    if skipped:
        print(f"QLoRA on CPU: {skipped} linear layers with in_features not a multiple of {CPU_BLOCK} stay unquantized")
    return model


def setup(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Path = Path("out/finetune/qlora"),
    precision: Optional[str] = None,
    quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"] = "bnb.nf4",
    devices: int = 1,
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
) -> None:
    """QLoRA fine-tuning with DropBP (one device: bitsandbytes quantization is single-device in litgpt too).

    Arguments:
        checkpoint_dir: litgpt checkpoint to fine-tune (default: the built-in tiny model and data).
        out_dir: where logs, checkpoints and ``final/`` (LoRA merged into the unquantized base) go.
        precision: compute precision of the quantized layers: "bf16-true", "16-true" or "32-true".
        quantize: bitsandbytes 4-bit format (``-dq``: double quantization of the scales).
        devices: must be 1.
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
    """
    precision = precision or trainer.default_precision()
    if precision not in QUANT_DTYPES:
        raise trainer.UsageError(
            f"QLoRA needs one of --precision {', '.join(QUANT_DTYPES)} (got {precision!r}): mixed precision"
            " cannot be combined with 4-bit quantization"
        )
    if devices != 1:
        raise trainer.UsageError("QLoRA runs on one device (--devices 1), as in litgpt")
    targets = dict(lora_query=lora_query, lora_key=lora_key, lora_value=lora_value, lora_projection=lora_projection,
                   lora_mlp=lora_mlp, lora_head=lora_head)
    mode, dtype = quantize[len("bnb."):], QUANT_DTYPES[precision]
    plugins, prepare = None, None
    if torch.cuda.is_available():
        from lightning.fabric.plugins import BitsandbytesPrecision

        plugins, precision = BitsandbytesPrecision(mode, dtype), None
    else:
        prepare = lambda model, fabric: quantize_frozen_linears(model, mode, dtype)  # noqa: E731
    method = lora_method("qlora", lora_r, lora_alpha, lora_dropout, targets, prepare=prepare)
    trainer.run(method, checkpoint_dir, out_dir, precision, devices, 1, data, train, eval, dropbp, pld,
                optimizer, logger_name, seed, resume, plugins=plugins)


if __name__ == "__main__":
    trainer.cli(setup)
