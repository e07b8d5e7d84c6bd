"""Fetching a data module's file (Alpaca, Dolly) checked and atomically.

litgpt's `download_if_missing` writes whatever the server answers, an error page included, and fails offline
with a long traceback that leaves an empty folder behind. Here a failed download writes nothing and raises one
`FileNotFoundError` saying where to put the file by hand.
"""

import os
from pathlib import Path


def download_data_file(url: str, path: Path, timeout: float = 60.0) -> None:
    import requests

    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if getattr(e, "response", None) is not None else type(e).__name__
        raise FileNotFoundError(
            f"{path} is missing and could not be downloaded from {url} ({reason}); without internet, copy the file"
            " there yourself (or point --data.download_dir and --data.file_name at it)"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(response.content)
    os.replace(tmp, path)
