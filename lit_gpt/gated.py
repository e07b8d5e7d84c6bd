"""The gated block: litgpt's Block.forward with each residual branch called through a DropBPGate.

Works for every block layout litgpt has: sequential (LLaMA), parallel residual (Pythia, Falcon, Phi; with or
without a shared attention norm) and post-branch norms (Gemma 2). Each addition happens in the same order as in
litgpt, so with no branch dropped or skipped the output is bitwise identical to litgpt's.
"""

from typing import Optional

import torch
from torch import nn

from dropbp.compile import compile_branch_functions
from dropbp.flops import attention_flops, mlp_flops
from dropbp.gate import DropBPGate, add_branch


def attention_branch(block, x: torch.Tensor, norm: bool, cos, sin, mask, input_pos, input_pos_maxp1) -> torch.Tensor:
    """A block's attention residual branch: ``norm_1`` (unless the caller applied a shared one), attention,
    ``post_attention_norm``. A function of the block, not a method or closure, so that one ``torch.compile`` of it
    serves every block (the modules are inlined: no recompile per block)."""
    if norm:
        x = block.norm_1(x)
    return block.post_attention_norm(block.attn(x, cos, sin, mask, input_pos, input_pos_maxp1))


def mlp_branch(block, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """A block's MLP residual branch: ``norm_2`` (unless shared with attention and applied by the caller), MLP,
    ``post_mlp_norm``."""
    if norm:
        x = block.norm_2(x)
    return block.post_mlp_norm(block.mlp(x))


class GatedBlock:
    """Mixin placed before a litgpt Block class; :func:`install_gates` turns built blocks into it."""

    attn_gate: DropBPGate
    mlp_gate: DropBPGate
    branches = None  # (attention, mlp) branch functions in place of the eager ones: see compile_branches
    reads_block_index = False  # litgpt's adapters: the attention branch tests block_idx (see compile_branches)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        input_pos_maxp1: Optional[int] = None,
    ) -> torch.Tensor:
        gates = self._modules  # not self.attn_gate: nn.Module.__getattr__ costs ~0.7 us a lookup on a slow CPU
        branches = self.branches if input_pos is None else None  # generation (a KV cache) runs eager
        if branches is None and gates["attn_gate"].passthrough and gates["mlp_gate"].passthrough:
            # Fast path (p = 0, or both branches kept and PLD off): litgpt's own Block.forward, so exactly its ATen
            # ops and no gate calls or add_branch (profiled on CPU: ~10 us of Python per block before).
            return super().forward(x, cos, sin, mask, input_pos, input_pos_maxp1)
        attention, mlp = branches or (attention_branch, mlp_branch)
        attn_args = (cos, sin, mask, input_pos, input_pos_maxp1)
        if self.config.parallel_residual and self.config.shared_attention_norm:
            # norm_1 feeds both branches: it needs a graph unless both are dropped
            both_dropped = self.attn_gate.dropped and self.mlp_gate.dropped
            with torch.set_grad_enabled(torch.is_grad_enabled() and not both_dropped):
                x_normed = self.norm_1(x)
            attention_output = self.attn_gate(attention, self, x_normed, False, *attn_args)
            mlp_output = self.mlp_gate(mlp, self, x_normed, False)
            return add_branch(mlp_output, add_branch(attention_output, x))
        attention_output = self.attn_gate(attention, self, x, True, *attn_args)
        if self.config.parallel_residual:
            mlp_output = self.mlp_gate(mlp, self, x, True)
            return add_branch(mlp_output, add_branch(attention_output, x))
        x = add_branch(attention_output, x)
        return add_branch(self.mlp_gate(mlp, self, x, True), x)


def compile_unsupported(quantized_on_cpu: bool) -> Optional[str]:
    """Why :func:`compile_branches` cannot serve a model, or None: every gated model compiles except one with
    bitsandbytes' 4-bit layers on the CPU (``quantized_on_cpu``: QLoRA there)."""
    if quantized_on_cpu:
        return ("QLoRA on the CPU: bitsandbytes repacks its 4-bit weights at their first call, under a compiled"
                " graph that expects the old layout")
    return None


def compile_branches(model: nn.Module, **compile_options) -> nn.Module:
    """``torch.compile`` the attention and MLP branch functions that every gated block of ``model`` calls through
    its gates. The gate decides outside the compiled code (a dropped branch is called under ``no_grad``), so a
    branch needs a graph per grad mode and per whether its input requires grad (with LoRA, not before the first
    kept branch with a trainable parameter), and one for evaluation: at most five, never one per drop mask, and
    shared by the blocks. Shapes are dynamic from the start (fine-tuning batches vary in length). In adapter models
    integer attributes of modules are dynamic too: litgpt's adapters test their block's ``block_idx`` against
    ``adapter_start_layer``, and a static index would compile a graph per block; dynamic, the adapter's attention
    branch needs those graphs for two kinds of block (with and without the prompt), plus one for evaluation with
    the prompt cached. Dynamo's recompile limit is raised to 16, so that no branch falls back to eager. These
    settings hold only while a compiled branch runs (:mod:`dropbp.compile`, shared with the Transformers
    integration): the rest of the process, a user's own compiled modules included, keeps Dynamo's. Embedding, head
    and loss stay eager; generation with a KV cache runs the eager branches."""
    blocks = [m for m in model.modules() if isinstance(m, GatedBlock)]
    if not blocks:
        raise ValueError("compile_branches: the model has no gated block (build it from lit_gpt)")
    per_block_ints = any(block.reads_block_index for block in blocks)
    branches = compile_branch_functions((attention_branch, mlp_branch), dynamic_module_ints=per_block_ints,
                                        **compile_options)
    for block in blocks:
        block.branches = branches
    return model


def install_gates(model: nn.Module, block_class: type, seq_len: Optional[int] = None) -> nn.Module:
    """Turn every block of a built litgpt model into ``block_class`` (a GatedBlock subclass of the block's own
    class) and give it an attention gate and an MLP gate. No parameter is created or re-initialised, so the
    state-dict keys and values, and the RNG stream, are those of the plain litgpt model."""
    litgpt_block = block_class.__bases__[-1]
    for idx, block in enumerate(model.transformer.h):
        if type(block) is not litgpt_block:
            raise TypeError(f"{block_class.__module__}.{block_class.__name__} cannot wrap a {type(block)}")
        block.__class__ = block_class
        norm_2 = block.norm_1 if block.norm_2 is None else block.norm_2  # shared attention norm
        block.attn_gate = DropBPGate("attn", idx, 1.0, (block.norm_1, block.attn, block.post_attention_norm))
        block.mlp_gate = DropBPGate("mlp", idx, 1.0, (norm_2, block.mlp, block.post_mlp_norm))
    set_gate_flops(model, seq_len or model.config.block_size)
    return model


def set_gate_flops(model: nn.Module, seq_len: int) -> None:
    """Weight each gate by its branch's FLOPs at the training sequence length (the attention term grows as s^2)."""
    config = model.config
    for block in model.transformer.h:
        # the modules actually built decide: litgpt's LoRA and adapter blocks replace latent attention with the
        # standard one, and the LoRA and adapter-v2 blocks put a MoE in DeepSeek's first dense blocks too
        latent = type(block.attn).__name__ == "MultiheadLatentAttention"
        block.attn_gate.flops = attention_flops(config, seq_len, latent=latent)
        block.mlp_gate.flops = mlp_flops(config, seq_len, dense=type(block.mlp).__name__ == "LLaMAMLP")


def reset_adapter_cache(model: nn.Module) -> None:
    """litgpt 0.5.13's adapter caches the prefix keys/values, graph included, on the first call, so a second
    training step back-propagates into a freed graph. Rebuild them whenever a graph is being recorded."""
    if torch.is_grad_enabled():
        for block in model.transformer.h:
            if getattr(block.attn, "adapter_kv_cache", None) is not None:
                block.attn.adapter_kv_cache = None
