"""Databricks Dolly 15k, which litgpt 0.5.13 no longer ships."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from litgpt.data import Alpaca
from torch.utils.data import random_split

from lit_gpt.data.builtin import sft_dataset

_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


@dataclass
class Dolly(Alpaca):
    """Dolly data module for supervised finetuning: Alpaca's interface, with Dolly's fields mapped to Alpaca's."""

    val_split_fraction: float = 0.1
    """The fraction of the dataset to use for the validation dataset. The rest is used for training."""
    download_dir: Path = Path("./data/dolly")
    """The directory in which the downloaded dataset gets saved."""
    file_url: str = field(repr=False, default=_URL)
    """The URL from where to download the dataset."""
    file_name: str = field(repr=False, default="databricks-dolly-15k.jsonl")
    """The name of the dataset file to download."""

    def setup(self, stage: str = "") -> None:
        data = load_dolly_jsonl(self.download_dir / self.file_name)

        # Partition the dataset into train and test
        train_data, test_data = random_split(
            data,
            [1.0 - self.val_split_fraction, self.val_split_fraction],
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.train_dataset = sft_dataset(self, list(train_data))
        self.test_dataset = sft_dataset(self, list(test_data))



def load_dolly_jsonl(path: Path) -> list[dict[str, str]]:
    """Reads Dolly's records as Alpaca examples: `instruction`, `context`, `response` become `instruction`, `input`,
    `output`. The published file is JSON Lines; a JSON array of the same records is read too."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
        where = "record"
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
        where = "line"
    examples = []
    for number, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where} {number}: expected a JSON object, got {type(record).__name__}.")
        bad = [key for key in ("instruction", "context", "response") if not isinstance(record.get(key), str)]
        if bad:
            raise ValueError(f"{path}, {where} {number}: missing or non-string fields {bad}.")
        examples.append({"instruction": record["instruction"], "input": record["context"],
                         "output": record["response"]})
    return examples
