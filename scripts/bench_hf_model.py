"""The benchmark's Transformers model (``scripts/benchmark.py --framework hf``): a random-init ``LlamaForCausalLM`` of
the shape the benchmark gives litgpt, optionally with PEFT LoRA, gated by ``dropbp.integrations.transformers`` or
left unpatched (the side-by-side baseline). Needs the ``hf`` extra (``pip install -e ".[hf]"``)."""

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from dropbp import DropBPHandler

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The LLaMA's dimensions (``seq_len``: its maximum positions, and the length the gates' FLOPs are for), and the
    LoRA adapters' rank and alpha. ``n_query_groups`` defaults to ``n_head``; ``intermediate_size`` to 8/3 of the
    width rounded down to 64, at least 64 (litgpt's LLaMA-2 shape in the benchmark)."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq_len: int
    n_query_groups: Optional[int] = None
    intermediate_size: Optional[int] = None
    lora_r: int = 8
    lora_alpha: int = 16


def llama_config(shape: LlamaShape, **overrides: Any):
    """A ``LlamaConfig`` of the shape ``scripts/benchmark.py`` gives litgpt (LLaMA-2 style: RMSNorm eps 1e-5, no
    bias, untied head, intermediate size 8/3 of the width rounded down to 64, at least 64), sdpa attention."""
    from transformers import LlamaConfig

    kwargs = dict(
        num_hidden_layers=shape.n_layer,
        hidden_size=shape.n_embd,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_query_groups or shape.n_head,
        intermediate_size=shape.intermediate_size or max(64, int(shape.n_embd * 8 / 3) // 64 * 64),
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = overrides.get("attn_implementation", "sdpa")
    return config


def build_gated_llama(
    shape: LlamaShape,
    method: str = "full",
    rate: Union[float, Sequence[float]] = 0.0,
    sampling: str = "fixed",
    seed: int = 0,
    init_seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    gated: bool = True,
) -> tuple:
    """A random-init Transformers ``LlamaForCausalLM`` of ``shape`` and its DropBP handler.

    ``method``: ``"full"`` (every parameter trains) or ``"lora"`` (PEFT LoRA, rank ``shape.lora_r``, alpha
    ``shape.lora_alpha``, no dropout, on q, k, v, o and the three MLP projections: the litgpt benchmark's LoRA
    layout; the result is the ``PeftModel``). Gates are installed with FLOPs at ``shape.seq_len``. ``gated=False``
    returns the unpatched model and ``None`` (the side-by-side baseline). The weights depend only on ``init_seed``,
    so the gated and unpatched models built with the same arguments are identical. Call
    ``model(input_ids=x, labels=y).loss``; call ``handler.sample()`` before each forward.
    """
    from transformers import LlamaForCausalLM

    from dropbp.integrations.transformers import install_gates

    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    config = llama_config(shape)
    device = torch.device(device)
    rng_devices = [] if device.type != "cuda" else [device.index or 0]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target precision and on the target device, as the litgpt rows
    try:
        with torch.random.fork_rng(devices=rng_devices), device:
            torch.manual_seed(init_seed)
            model = LlamaForCausalLM(config)
            if method == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=shape.lora_r, lora_alpha=shape.lora_alpha, lora_dropout=0.0,
                                  target_modules=list(LORA_TARGETS))
                model = get_peft_model(model, lora)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to(device=device, dtype=dtype)
    model.train()
    if not gated:
        return model, None
    install_gates(model, seq_len=shape.seq_len)
    return model, DropBPHandler(model, rate=rate, sampling=sampling, seed=seed)
