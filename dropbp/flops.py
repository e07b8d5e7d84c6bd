"""Forward FLOPs of each residual branch, from a model config and a sequence length.

Duck-typed on litgpt's ``Config`` fields (no litgpt import). Backward costs about 2x forward in full
fine-tuning and 1x in parameter-efficient fine-tuning, the same factor for every branch, so these numbers
serve directly as the branch weights of the FLOPs budget. A multiply-add counts as 2 FLOPs; bias additions,
norms, activations and softmax are left out (a fraction of a percent at litgpt's sizes).
"""


def attention_flops(config, seq_len: int, latent=None) -> float:
    """Projections + scores and weighted sum (dense causal, not halved) + output projection.

    ``latent``: multi-head latent attention (DeepSeek's MLA, litgpt's ``latent_attention``); by default whatever
    the config says. litgpt's LoRA and adapter models build the standard attention even for such a config, so
    callers that hold a built model pass what was actually built."""
    s, d, heads = seq_len, config.n_embd, config.n_head
    if getattr(config, "latent_attention", None) if latent is None else latent:
        qk, v = config.qk_rope_head_dim + config.qk_nope_head_dim, config.v_head_dim
        q = 2 * s * (d * config.q_lora_rank + config.q_lora_rank * heads * qk)
        kv = 2 * s * (
            d * (config.kv_lora_rank + config.qk_rope_head_dim)
            + config.kv_lora_rank * config.n_query_groups * (config.qk_nope_head_dim + v)
        )
        scores = 2 * s * s * heads * (qk + v)
        proj = 2 * s * heads * v * d
        return float(q + kv + scores + proj)
    groups, hs = config.n_query_groups, config.head_size
    qkv = 2 * s * d * (heads + 2 * groups) * hs
    scores = 4 * s * s * heads * hs
    proj = 2 * s * heads * hs * d
    return float(qkv + scores + proj)


def mlp_flops(config, seq_len: int, dense: bool = False) -> float:
    """``dense``: a LLaMA MLP in a MoE model's first dense blocks (DeepSeek's ``first_k_dense_replace``).

    A mixture of experts (litgpt's ``LLaMAMoE``) costs its router, plus each token's ``n_expert_per_token`` routed
    experts, plus the shared experts every token goes through (``n_shared_expert``, one LLaMA MLP
    ``n_shared_expert`` times as wide as a routed expert). An expert is a LLaMA MLP (3 matmuls) of width
    ``moe_intermediate_size``, or ``intermediate_size`` when that is unset (Mixtral), as litgpt builds it."""
    s, d = seq_len, config.n_embd
    name = "LLaMAMLP" if dense else config.mlp_class_name
    if name == "GptNeoxMLP":
        return float(2 * s * d * config.intermediate_size * 2)
    if name in ("LLaMAMLP", "GemmaMLP"):
        return float(2 * s * d * config.intermediate_size * 3)
    if name == "LLaMAMoE":
        expert_size = config.moe_intermediate_size or config.intermediate_size
        router = 2 * s * d * config.n_expert
        routed = config.n_expert_per_token * 2 * s * d * expert_size * 3
        shared = 2 * s * d * expert_size * (getattr(config, "n_shared_expert", None) or 0) * 3
        return float(router + routed + shared)
    raise ValueError(f"no FLOPs formula for mlp_class_name={name!r}")


def branch_flops(config, seq_len: int) -> list:
    """[attn_0, mlp_0, attn_1, mlp_1, ...]: the order in which litgpt blocks create their gates (litgpt's base
    model; ``lit_gpt.gated.set_gate_flops`` weighs the branches of a built model, LoRA and adapters included)."""
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    dense_k = getattr(config, "first_k_dense_replace", None) or 0
    return [
        f
        for layer in range(config.n_layer)
        for f in (attention_flops(config, seq_len), mlp_flops(config, seq_len, dense=layer < dense_k))
    ]
