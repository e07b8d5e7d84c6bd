"""4-bit frozen base weights for QLoRA: a model transformation shared by the QLoRA recipe and the benchmarks.

On GPU the recipe lets Lightning's bitsandbytes precision plugin quantize the base (litgpt's `--quantize` path);
Lightning refuses that plugin on CPU, so there the frozen linear layers are replaced by bitsandbytes' own
`Linear4bit` directly (quantized when moved to the device).

bitsandbytes 0.50 has an inference-only CPU path: on a CPU with AVX512-BF16, the first call of a ``Linear4bit`` in
eval mode on an input that needs no gradient (a validation batch) repacks its weight, in place, into a layout whose
kernel (``gemv_4bit``) has no autograd formula, and gradients through the layer are lost from then on (reported
on such a CPU: layer 0's ``lora_A`` gradient norm 0.022 before one validation batch, 0.0 after; a 20-step QLoRA run
whose ``lora_B`` stayed exactly zero). Every recipe validates before training. The layers made here switch that
path off (:func:`keep_trainable`), so they compute the same dequantize-and-GEMM in training and evaluation.
"""

import logging

import torch

CPU_BLOCK = 64
QUANT_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}  # compute dtypes


def quantize_frozen_linears(
    model: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: str = "cpu"
) -> torch.nn.Module:
    """Replace every frozen ``nn.Linear`` by a bitsandbytes ``Linear4bit`` holding the same weights, quantized when
    moved to ``device`` (the CPU path of the recipe; the benchmark uses it on GPU too)."""
    bnb = import_bitsandbytes()
    quant_type, double_quant = mode.split("-")[0], mode.endswith("-dq")
    skipped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.requires_grad:
                continue
            # bitsandbytes' CPU kernels need whole 64-wide blocks per row
            if device == "cpu" and child.in_features % CPU_BLOCK:
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
            setattr(parent, name, keep_trainable(q.to(device)))  # moving to a device quantizes the weight
    if skipped:
        print(f"QLoRA on CPU: {skipped} linear layers with in_features not a multiple of {CPU_BLOCK} stay unquantized")
    return model


def keep_trainable(layer: torch.nn.Module) -> torch.nn.Module:
    """Switch off bitsandbytes' inference-only CPU repacking of a ``Linear4bit`` (see the module docstring): its
    output then always carries the gradient to its input. No effect on GPU, where that path is never taken."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return layer


def _not_the_kernels_package_warning(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def import_bitsandbytes():
    """``bitsandbytes``, imported without its warning, on an AVX512-BF16 CPU, that the optional ``kernels`` package
    is missing: that kernel serves only the inference-only path :func:`keep_trainable` switches off."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_package_warning)  # idempotent
    import bitsandbytes

    return bitsandbytes
