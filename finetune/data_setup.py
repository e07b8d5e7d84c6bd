"""The data module of a run made ready: downloaded file checked, records checked, workers fitted to the machine."""

import json
import os
from pathlib import Path

from litgpt.data import DataModule
from torch.utils.data import Subset

from finetune.cli import UsageError
from lit_gpt.data.download import download_data_file


def limit_workers(data: DataModule) -> None:
    """At most one data-loading worker per CPU core this process may use: litgpt's Alpaca and JSON modules ask for 4,
    and PyTorch warns on every run on a smaller machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if getattr(data, "num_workers", 0) > cores:
        data.num_workers = cores


def prepare_data(data: DataModule) -> None:
    """``data.prepare_data()``, with the file of a downloading module (Alpaca, Dolly) fetched first, checked."""
    url, folder, name = (getattr(data, a, None) for a in ("file_url", "download_dir", "file_name"))
    if url and folder and name:
        path = Path(folder) / name
        if not (path.is_file() and path.stat().st_size > 0):
            download_data_file(url, path)
    data.prepare_data()


def setup_data(data: DataModule) -> None:
    """``data.setup()``, with a malformed file reported as one clear error before training starts, not as a
    traceback from a dataloader half-way through the run."""
    source = getattr(data, "json_path", None) or type(data).__name__
    try:
        data.setup()
    except json.JSONDecodeError as e:
        raise UsageError(f"{source}: not valid JSON ({e})") from None
    for dataset in (data.train_dataset, validation_split(data)):  # litgpt splits an object by its keys, silently
        held = loaded(dataset)
        if isinstance(held, (dict, str)):
            what = f"an object with keys {', '.join(list(held)[:5])}" if isinstance(held, dict) else "a string"
            raise UsageError(f"{source}: the file must hold a JSON list of records (objects with instruction, input"
                             f" and output); it holds {what}")
    for dataset, name in ((data.train_dataset, "training"), (validation_split(data), "validation")):
        if len(dataset) == 0:
            raise UsageError(f"{source}: the {name} split is empty (too few records for the split; a JSON file's"
                             " --data.val_split_fraction sets the validation share)")
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        records = getattr(getattr(data, split, None), "data", None)
        for i, record in enumerate(records or []):
            if not isinstance(record, dict):
                raise UsageError(f"{source}: record {i} of the {split[:-8]} split is not a JSON object")
            missing = [f for f in ("instruction", "output") if not isinstance(record.get(f), str)]
            if missing:
                raise UsageError(f"{source}: record {i} of the {split[:-8]} split lacks field(s) {', '.join(missing)}")


def loaded(dataset):
    """What a split was made from: litgpt's JSON and Alpaca modules split the file's content with `random_split`."""
    held = getattr(dataset, "data", None)
    return held.dataset if isinstance(held, Subset) else held


def validation_split(data: DataModule):
    """litgpt's modules keep it as ``test_dataset`` (Alpaca, JSON, Dolly), ours as ``val_dataset`` (Builtin)."""
    dataset = getattr(data, "test_dataset", None)
    return dataset if dataset is not None else data.val_dataset
