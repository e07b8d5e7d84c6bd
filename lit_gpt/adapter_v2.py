"""litgpt's adapter v2 GPT with a DropBP gate on every attention and MLP residual branch.

litgpt 0.5.13's ``AdapterV2Linear`` computes ``adapter_scale * (linear(x) + adapter_bias)``: a GEMM, then two
full-size elementwise passes. :class:`FastAdapterV2Linear` hands ``adapter_bias`` (plus the frozen base bias, a
vector add) to the GEMM as its bias, so the add rides in the GEMM's epilogue (``addmm``) and only the scale remains
a separate pass. The scale cannot be folded into the weight: its gradient needs the unscaled output, and scaling
the weight would cost a weight-sized pass and a weight-sized gradient. Parameters and state dict are litgpt's.
"""

import litgpt.adapter_v2
import torch
from litgpt.adapter_v2 import Config, mark_only_adapter_v2_as_trainable  # noqa: F401 (re-exported)
from torch import nn

from lit_gpt.gated import GatedBlock, install_gates, reset_adapter_cache


class FastAdapterV2Linear(litgpt.adapter_v2.AdapterV2Linear):
    """litgpt's ``AdapterV2Linear`` with the adapter bias added inside the GEMM (one kernel fewer per forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if type(linear) is not nn.Linear:  # e.g. a quantized base: litgpt's formula
            return super().forward(x)
        bias = self.adapter_bias if linear.bias is None else linear.bias + self.adapter_bias
        return self.adapter_scale * torch.nn.functional.linear(x, linear.weight, bias)


def install_fast_adapter_v2(model: nn.Module) -> nn.Module:
    """Turn every litgpt ``AdapterV2Linear`` of a built model into :class:`FastAdapterV2Linear`, in place (only the
    class changes: parameters, their initialisation and the RNG stream are litgpt's)."""
    for module in model.modules():
        if type(module) is litgpt.adapter_v2.AdapterV2Linear:
            module.__class__ = FastAdapterV2Linear
    return model


class Block(GatedBlock, litgpt.adapter_v2.Block):
    reads_block_index = True  # the adapter prompt's blocks: block_idx >= adapter_start_layer


class GPT(litgpt.adapter_v2.GPT):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        install_fast_adapter_v2(self)
        install_gates(self, Block)

    def forward(self, *args, **kwargs):
        reset_adapter_cache(self)
        return super().forward(*args, **kwargs)
