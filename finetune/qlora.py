"""QLoRA fine-tuning with DropBP: LoRA on a 4-bit (bitsandbytes) frozen base model.

On GPU the base is quantized by Lightning's bitsandbytes precision plugin (litgpt's `--quantize` path). Lightning
refuses that plugin on CPU, so there the frozen linear layers are replaced by bitsandbytes' own `Linear4bit`
directly (`lit_gpt/quantize.py`); `launch.launch_plan` makes that choice.
Example: python finetune/qlora.py --dropbp.rate 0.875
"""

import sys
from pathlib import Path
from typing import Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import DataModule

from finetune import trainer
from finetune.args import DropBPArgs, PLDArgs
from finetune.lora import lora_method


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
    overwrite: bool = False,
    compile: bool = False,
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
        overwrite: replace a run already in out_dir (otherwise refused, so that no run is lost).
        compile: torch.compile each block's attention and MLP branch (one device; the first steps compile).
    """
    targets = dict(lora_query=lora_query, lora_key=lora_key, lora_value=lora_value, lora_projection=lora_projection,
                   lora_mlp=lora_mlp, lora_head=lora_head)
    method = lora_method("qlora", lora_r, lora_alpha, lora_dropout, targets, quantize=quantize)
    options = trainer.Options(checkpoint_dir, out_dir, precision, devices, 1, data, train, eval, dropbp, pld,
                              optimizer, logger_name, seed, resume, overwrite, compile)
    trainer.run(method, options)

if __name__ == "__main__":
    trainer.cli(setup)
