"""litgpt's base GPT with a DropBP gate on every attention and MLP residual branch."""

import litgpt.model

from lit_gpt.gated import GatedBlock, install_gates
from litgpt.config import Config


class Block(GatedBlock, litgpt.model.Block):
    pass


class GPT(litgpt.model.GPT):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        install_gates(self, Block)
