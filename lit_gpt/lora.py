"""litgpt's LoRA GPT with a DropBP gate on every attention and MLP residual branch."""

import litgpt.lora
from litgpt.lora import Config, mark_only_lora_as_trainable, merge_lora_weights  # noqa: F401 (re-exported)

from lit_gpt.gated import GatedBlock, install_gates


class Block(GatedBlock, litgpt.lora.Block):
    pass


class GPT(litgpt.lora.GPT):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        install_gates(self, Block)
