"""Every litgpt config builds with a gate on each residual branch (invariant 8), for the base, LoRA and adapter
models, with branch FLOPs that match the matmuls the built modules hold; MoE FLOPs (Mixtral, Qwen3-MoE, shared
experts, latent attention) by hand."""

import math

import pytest
import torch
from litgpt.config import Config, configs
from torch import nn

import lit_gpt.adapter
import lit_gpt.adapter_v2
import lit_gpt.lora
import lit_gpt.model
from dropbp import branch_flops
from dropbp.gate import find_gates
from lit_gpt.gated import set_gate_flops

LORA = dict(
    lora_r=8, lora_alpha=16, lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True,
    lora_head=True,
)
VARIANTS = {
    "model": (lit_gpt.model.GPT, Config, {}),
    "lora": (lit_gpt.lora.GPT, lit_gpt.lora.Config, LORA),
    "adapter": (lit_gpt.adapter.GPT, lit_gpt.adapter.Config, {}),
    "adapter_v2": (lit_gpt.adapter_v2.GPT, lit_gpt.adapter_v2.Config, {}),
}


def matmul_weights(module) -> int:
    """Weight elements of the matmuls a module runs (LoRA/adapter wrappers hold an nn.Linear; litgpt's grouped
    MoE router holds a bare weight)."""
    if module is None:
        return 0
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "GroupedTopkRouter"
    )


def expected_flops(block, config, s: int):
    """Branch FLOPs from the built modules' weights: 2 FLOPs per weight per token, plus attention's s^2 terms."""
    if type(block.attn).__name__ == "MultiheadLatentAttention":
        scores = 2 * s * s * config.n_head * (config.qk_rope_head_dim + config.qk_nope_head_dim + config.v_head_dim)
    else:
        scores = 4 * s * s * config.n_head * config.head_size
    attn = 2 * s * matmul_weights(block.attn) + scores
    mlp = block.mlp
    if hasattr(mlp, "experts"):  # router + the top-k routed experts + the shared experts, per token
        weights = (
            matmul_weights(mlp.gate)
            + config.n_expert_per_token * matmul_weights(mlp.experts[0])
            + matmul_weights(getattr(mlp, "shared_experts", None))
        )
    else:
        weights = matmul_weights(mlp)
    return attn, 2 * s * weights


def build(variant: str, name: str, **overrides):
    gpt, config_class, extra = VARIANTS[variant]
    config = config_class.from_name(name, **{**extra, **overrides})
    with torch.device("meta"):  # no memory, no init: shapes only
        return gpt(config)


def check_gates(model, seq_len=None) -> None:
    config = model.config
    gates = find_gates(model)
    assert len(gates) == 2 * config.n_layer
    for idx, block in enumerate(model.transformer.h):
        assert gates[2 * idx] is block.attn_gate and gates[2 * idx + 1] is block.mlp_gate
        for gate in (block.attn_gate, block.mlp_gate):
            assert math.isfinite(gate.flops) and gate.flops > 0, (idx, gate)
        attn, mlp = expected_flops(block, config, seq_len or config.block_size)
        assert block.attn_gate.flops == pytest.approx(attn, rel=1e-12), idx
        assert block.mlp_gate.flops == pytest.approx(mlp, rel=1e-12), idx


# Full-size, the 210 configs x 4 variants take ~6 minutes to build even on the meta device (Python builds every
# module: Qwen3-235B's LoRA model alone has 94 layers x 128 experts x 3 LoRA linears). Every layer of a config has
# the same shapes except DeepSeek's first dense blocks, so keep 2 layers beyond those: n_embd, heads, MoE, latent
# attention, norms and residual layout are untouched (all that the gates and the FLOPs depend on): ~10 s in all.
@pytest.mark.parametrize("name", [c["name"] for c in configs])
def test_every_litgpt_config_builds_with_gates_and_matching_flops(name, one_thread):
    spec = next(c for c in configs if c["name"] == name)
    n_layer = min(spec.get("n_layer", Config.n_layer), (spec.get("first_k_dense_replace") or 0) + 2)
    for variant in VARIANTS:
        model = build(variant, name, n_layer=n_layer)
        check_gates(model)
        if variant == "model":
            assert [g.flops for g in find_gates(model)] == branch_flops(model.config, model.config.block_size)


def test_mixtral_and_qwen3_moe_mlp_flops_by_hand(one_thread):
    s = 512
    # Mixtral leaves moe_intermediate_size unset: litgpt's experts take intermediate_size
    for name, d, inter, n_expert, top_k in (
        ("Mixtral-8x7B-v0.1", 4096, 14336, 8, 2),
        ("Mixtral-8x22B-v0.1", 6144, 16384, 8, 2),
        ("Qwen3-30B-A3B", 2048, 768, 128, 8),
        ("Qwen3-235B-A22B", 4096, 1536, 128, 8),
    ):
        config = Config.from_name(name)
        router = 2 * s * d * n_expert
        expert = 3 * (2 * s * d * inter)  # fc_1, fc_2, proj
        assert branch_flops(config, s)[1] == router + top_k * expert, name
        for variant in VARIANTS:
            model = build(variant, name, n_layer=1)
            set_gate_flops(model, s)
            assert model.transformer.h[0].mlp_gate.flops == router + top_k * expert, (name, variant)


def deepseek_like(**overrides) -> Config:
    """No litgpt 0.5.13 config has shared experts, latent attention or dense first blocks, but its base model
    builds them (DeepSeek-V3's layout, shrunk)."""
    spec = dict(
        name="deepseek-like", block_size=64, n_layer=3, n_embd=64, n_head=4, n_query_groups=4, vocab_size=128,
        padded_vocab_size=128, norm_class_name="RMSNorm", parallel_residual=False, bias=False,
        mlp_class_name="LLaMAMoE", intermediate_size=160, moe_intermediate_size=24, n_expert=8, n_expert_per_token=2,
        n_shared_expert=2, first_k_dense_replace=1, n_expert_groups=4, n_topk_groups=2, n_topk_scores_per_group=2,
        latent_attention=dict(q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    )
    return Config(**{**spec, **overrides})


def test_shared_experts_latent_attention_and_dense_first_blocks_are_counted(one_thread):
    config = deepseek_like()
    s, d, h = 32, 64, 4
    with torch.device("meta"):
        model = lit_gpt.model.GPT(config)
    set_gate_flops(model, s)
    assert hasattr(model.transformer.h[1].mlp, "shared_experts")
    dense = 3 * 2 * s * d * 160
    moe = 2 * s * d * 8 + 2 * 3 * (2 * s * d * 24) + 3 * (2 * s * d * (2 * 24))  # router, 2 routed, 2 shared
    q = 2 * s * (d * 48 + 48 * h * (8 + 16))
    kv = 2 * s * (d * (32 + 8) + 32 * h * (16 + 16))
    mla = q + kv + 2 * s * s * h * (8 + 16 + 16) + 2 * s * h * 16 * d
    assert [g.flops for g in find_gates(model)] == [mla, dense, mla, moe, mla, moe]
    assert branch_flops(config, s) == [mla, dense, mla, moe, mla, moe]
    check_gates(model, s)  # and the same from the built modules' weights
    # without shared experts only the router and the routed experts remain
    assert branch_flops(deepseek_like(n_shared_expert=None), s)[3] == moe - 3 * (2 * s * d * 48)
