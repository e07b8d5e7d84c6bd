"""litgpt's adapter (v1) GPT with a DropBP gate on every attention and MLP residual branch."""

import litgpt.adapter
from litgpt.adapter import Config, mark_only_adapter_as_trainable  # noqa: F401 (re-exported)

from lit_gpt.gated import GatedBlock, install_gates, reset_adapter_cache


class Block(GatedBlock, litgpt.adapter.Block):
    reads_block_index = True  # the adapter prompt's blocks: block_idx >= adapter_start_layer


class GPT(litgpt.adapter.GPT):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        install_gates(self, Block)

    def forward(self, *args, **kwargs):
        reset_adapter_cache(self)
        return super().forward(*args, **kwargs)
