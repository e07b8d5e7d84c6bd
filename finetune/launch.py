"""Everything decided before Fabric starts: the checkpoint directory, and every choice that differs between a GPU
and a CPU (precision, plugins, strategy, the QLoRA route)."""

import os
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.model import Block

from finetune.cli import UsageError
from lit_gpt.quantize import QUANT_DTYPES, import_bitsandbytes, quantize_frozen_linears
from lit_gpt.tiny_model import TINY_MODEL_NOTE, ensure_tiny_checkpoint


REQUIRED_CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml")


def resolve_checkpoint_dir(checkpoint_dir: Optional[Path]) -> Path:
    if checkpoint_dir is None:
        checkpoint_dir = ensure_tiny_checkpoint()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once, not once per process
            print(TINY_MODEL_NOTE)
        return checkpoint_dir
    checkpoint_dir = Path(checkpoint_dir).expanduser().resolve()
    if not checkpoint_dir.is_dir():
        raise UsageError(
            f"checkpoint dir {checkpoint_dir} not found (download one with `litgpt download <repo_id>`,"
            " or leave --checkpoint_dir out to use the built-in tiny model)"
        )
    missing = [f for f in REQUIRED_CHECKPOINT_FILES if not (checkpoint_dir / f).is_file()]
    if not any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise UsageError(f"checkpoint dir {checkpoint_dir} is incomplete: missing {', '.join(missing)}")
    return checkpoint_dir


def launch_plan(method, precision: Optional[str], devices: int, num_nodes: int) -> tuple:
    """Every decision that differs between a GPU and a CPU, in one place: the arguments Fabric gets (precision,
    plugins, strategy, devices) and, for QLoRA, the function that quantizes the frozen base on the CPU (None when
    Lightning's bitsandbytes plugin does it on the GPU)."""
    cuda = torch.cuda.is_available()
    if precision is None:  # bf16 on CPU is 1.2-2x slower than fp32 and gains nothing there
        precision = ("bf16-true" if torch.cuda.is_bf16_supported() else "16-true") if cuda else "32-true"
    plugins, quantize_base = None, None
    if method.quantize is not None:
        if precision not in QUANT_DTYPES:
            raise UsageError(
                f"QLoRA needs one of --precision {', '.join(QUANT_DTYPES)} (got {precision!r}): mixed precision"
                " cannot be combined with 4-bit quantization"
            )
        if devices * num_nodes != 1:
            raise UsageError("QLoRA runs on one device (--devices 1), as in litgpt")
        mode, dtype = method.quantize[len("bnb."):], QUANT_DTYPES[precision]
        if cuda:  # litgpt's route; Fabric refuses a precision string next to a precision plugin
            import_bitsandbytes()  # first, quietly: the plugin imports it
            plugins, precision = BitsandbytesPrecision(mode, dtype), None
        else:  # Lightning refuses the plugin on CPU: bitsandbytes' own 4-bit layers, quantized when moved
            quantize_base = lambda model: quantize_frozen_linears(model, mode, dtype)  # noqa: E731
    args = dict(devices=devices, num_nodes=num_nodes, strategy=choose_strategy(method, devices * num_nodes, cuda),
                precision=precision, plugins=plugins)
    return args, quantize_base


def choose_strategy(method, world_size: int, cuda: bool):
    """Full fine-tuning on GPUs: FSDP, as litgpt (Lightning has no FSDP on CPU). Otherwise DDP. Either reduces the
    gradients once per step, in the last micro-batch (see `train_steps`)."""
    if world_size == 1:
        return "auto"
    if method.full and cuda:
        return FSDPStrategy(
            auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, state_dict_type="full",
            limit_all_gathers=True, cpu_offload=False,
        )
    # DDP reduces in each step's last micro-batch, overlapped with its backward, from buckets that the gradients
    # are views of (no second copy)
    return DDPStrategy(gradient_as_bucket_view=True)
