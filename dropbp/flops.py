"""Forward FLOPs of each residual branch, from a model config and a sequence length.

Duck-typed on litgpt's ``Config`` fields (no litgpt import). Backward costs about 2x forward in full
fine-tuning and 1x in parameter-efficient fine-tuning, the same factor for every branch, so these numbers
serve directly as the branch weights of the FLOPs budget. A multiply-add counts as 2 FLOPs.
"""


def attention_flops(config, seq_len: int) -> float:
    """QKV projection + scores and weighted sum (4 * s^2 * h, dense causal not halved) + output projection."""
    s, heads, groups, hs, d = seq_len, config.n_head, config.n_query_groups, config.head_size, config.n_embd
    qkv = 2 * s * d * (heads + 2 * groups) * hs
    scores = 4 * s * s * heads * hs
    proj = 2 * s * heads * hs * d
    return float(qkv + scores + proj)


def mlp_flops(config, seq_len: int, dense: bool = False) -> float:
    """``dense``: a LLaMA MLP in a MoE model's first dense blocks (DeepSeek's ``first_k_dense_replace``)."""
    s, d = seq_len, config.n_embd
    name = "LLaMAMLP" if dense else config.mlp_class_name
    if name == "GptNeoxMLP":
        return float(2 * s * d * config.intermediate_size * 2)
    if name in ("LLaMAMLP", "GemmaMLP"):
        return float(2 * s * d * config.intermediate_size * 3)
    if name == "LLaMAMoE":
        router = 2 * s * d * config.n_expert
        experts = config.n_expert_per_token * 2 * s * d * config.moe_intermediate_size * 3
        return float(router + experts)
    raise ValueError(f"no FLOPs formula for mlp_class_name={name!r}")


def branch_flops(config, seq_len: int) -> list:
    """[attn_0, mlp_0, attn_1, mlp_1, ...]: the order in which litgpt blocks create their gates."""
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    dense_k = getattr(config, "first_k_dense_replace", None) or 0
    return [
        f
        for layer in range(config.n_layer)
        for f in (attention_flops(config, seq_len), mlp_flops(config, seq_len, dense=layer < dense_k))
    ]
