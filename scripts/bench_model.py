"""The models the benchmark times: what to build (:class:`ModelSpec`), built gated or plain, and QLoRA's 4-bit base.

Our gated models come from ``lit_gpt``, the plain (unpatched) ones from ``litgpt``, with the same weights for the
same spec; ``framework="hf"`` builds a Transformers LLaMA of the same shape (``scripts/bench_hf_model.py``).
"""

from dataclasses import dataclass, field
from typing import Optional

import litgpt.adapter_v2
import litgpt.lora
import litgpt.model
import torch

import lit_gpt.adapter_v2
import lit_gpt.lora
import lit_gpt.model
from lit_gpt.gated import compile_branches

DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
LORA = dict(lora_r=8, lora_alpha=16, lora_query=True, lora_key=True, lora_value=True, lora_projection=True,
            lora_mlp=True)


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: the fine-tuning ``method`` (full, lora, qlora, adapter), a litgpt config name
    (``model_name``, random weights) or else a LLaMA-architecture model of ``dims`` (n_layer, n_embd, n_head,
    vocab_size), where it runs and in which precision, ``framework`` ("litgpt" or "hf"), and whether its branch
    functions are compiled."""

    method: str = "full"
    model_name: Optional[str] = None
    dims: dict = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "32-true"
    framework: str = "litgpt"
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def make_config(config_class, model_name: Optional[str], dims: dict, block_size: int, **extra):
    if model_name is not None:
        given = {k: v for k, v in dims.items() if v}
        return config_class.from_name(model_name, block_size=block_size, **given, **extra)
    n_embd = dims["n_embd"]
    return config_class.from_name(
        "Llama-2-7b-hf", n_layer=dims["n_layer"], n_embd=n_embd, n_head=dims["n_head"], n_query_groups=dims["n_head"],
        block_size=block_size, vocab_size=dims["vocab_size"], padded_vocab_size=dims["vocab_size"],
        intermediate_size=max(64, int(n_embd * 8 / 3) // 64 * 64), **extra,
    )


def build(spec: ModelSpec, block_size: int, plain: bool = False):
    """Our gated model (or plain litgpt's, for the overhead comparison), trainable parameters marked as in the recipe.
    ``framework="hf"``: a Hugging Face Transformers LLaMA of the same shape (PEFT LoRA for ``lora``), gated by
    ``dropbp.integrations.transformers`` (or unpatched, ``plain``)."""
    method, model_name, dims = spec.method, spec.model_name, spec.dims
    if spec.framework == "hf":
        from scripts.bench_hf_model import LlamaShape, build_gated_llama

        if model_name is not None or method not in ("full", "lora"):
            raise SystemExit("error: --framework hf builds a LLaMA of --n_layer x --n_embd, for --methods full/lora")
        shape = LlamaShape(dims["n_layer"], dims["n_embd"], dims["n_head"], dims["vocab_size"], block_size)
        return build_gated_llama(shape, method=method, device=spec.device, dtype=spec.dtype, gated=not plain)[0]
    if method == "full":
        cls = litgpt.model.GPT if plain else lit_gpt.model.GPT
        config = make_config(litgpt.model.Config, model_name, dims, block_size)
    elif method in ("lora", "qlora"):
        cls = litgpt.lora.GPT if plain else lit_gpt.lora.GPT
        config = make_config(litgpt.lora.Config, model_name, dims, block_size, **LORA)
    elif method == "adapter":
        cls = litgpt.adapter_v2.GPT if plain else lit_gpt.adapter_v2.GPT
        config = make_config(litgpt.adapter_v2.Config, model_name, dims, block_size)
    else:
        raise SystemExit(f"error: unknown method {method!r}; choose full, lora, qlora or adapter")
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)  # build in the target precision: a 7B model never exists in fp32 on the GPU
    try:
        with torch.device(spec.device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if method in ("lora", "qlora"):
        litgpt.lora.mark_only_lora_as_trainable(model)
    elif method == "adapter":
        litgpt.adapter_v2.mark_only_adapter_v2_as_trainable(model)
    if spec.compile:  # ours: the branch functions (as --compile true in the recipes); plain litgpt: each whole block
        if plain:
            for block in model.transformer.h:
                block.compile(dynamic=True)
        else:
            compile_branches(model)
    return model


def quantize(spec: ModelSpec, model):
    """QLoRA: the frozen base in bitsandbytes NF4 (after any weight copying: 4-bit state dicts differ)."""
    if spec.method != "qlora":
        return model
    from lit_gpt.quantize import quantize_frozen_linears

    return quantize_frozen_linears(model, "nf4", spec.dtype, device=spec.device)
