"""Data modules the recipes offer: `--data Alpaca|Dolly|JSON|Builtin`."""

from litgpt.data import JSON, Alpaca, DataModule

from lit_gpt.data.builtin import Builtin
from lit_gpt.data.dolly import Dolly

__all__ = ["Alpaca", "Builtin", "DataModule", "Dolly", "JSON"]
