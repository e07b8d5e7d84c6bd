"""Lit-GPT models with a DropBP gate on every residual branch (subclasses of litgpt 0.5.13's models)."""

from lit_gpt.gated import GatedBlock, install_gates, set_gate_flops
from lit_gpt.model import GPT, Block

__all__ = ["GPT", "Block", "GatedBlock", "install_gates", "set_gate_flops"]
