r"""Put several evaluated runs into one Table-1 markdown table and a CSV.

    python eval/make_table.py "LoRA=out/lora/final/eval" "LoRA + PLD=out/lora-pld/final/eval" \
        "DropBP p=0.5=out/lora-dropbp-0.5/final/eval" "DropBP p=0.875=out/lora-dropbp-0.875/final/eval"

A run is LABEL=PATH, or just PATH (then labelled by its checkpoint directory); labels and paths may contain '='.
PATH is a results JSON written by eval/evaluate.py or a directory of them (results_*.json). All results of one label
fill one row, so a run's MMLU and commonsense evaluations, two evaluate.py calls, end up side by side.
"""

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

from eval.presets import markdown_table, table_headers, table_row


class InputError(Exception):
    """A run that cannot be read; the message says which and why."""


def load_results(path: Path) -> list[dict]:
    files = sorted(path.glob("results_*.json")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise InputError(f"no results JSON at {path}")
    results = []
    for file in files:
        try:
            content = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"cannot read {file}: {error}") from None
        if not isinstance(content, dict) or not isinstance(content.get("results"), dict):
            raise InputError(f"{file} is not an lm-eval results JSON (no 'results' entry)")
        results.append(content)
    return results


def split_run(run: str) -> tuple[Optional[str], Path]:
    """LABEL=PATH -> (LABEL, PATH), PATH -> (None, PATH): the path is what follows the first '=' that leaves an
    existing path (else the last '=', for the error message)."""
    if Path(run).exists():
        return None, Path(run)
    for i, char in enumerate(run):
        if char == "=" and Path(run[i + 1 :]).exists():
            return run[:i], Path(run[i + 1 :])
    label, _, path = run.rpartition("=")
    return label or None, Path(path)


def gather_rows(runs: list[str], metric: Optional[str] = None) -> dict[str, dict[str, float]]:
    """label -> table row, in the order the labels first appear."""
    rows = {}
    for run in runs:
        label, path = split_run(run)
        for results in load_results(path):
            run_label = label or results.get("config", {}).get("checkpoint_dir") or str(path)
            rows.setdefault(run_label, {}).update(table_row(results, metric))
    return rows


def write_csv(rows: dict[str, dict[str, float]], path: Path) -> None:
    headers = table_headers(rows)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Run"] + headers)
        for label, row in rows.items():
            writer.writerow([label] + [round(row[h], 4) if h in row else "" for h in headers])


def main(runs: list[str], out_dir: Path = Path("out/table"), metric: Optional[str] = None) -> str:
    rows = gather_rows(runs, metric)
    table = markdown_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table + "\n")
    write_csv(rows, out_dir / "table.csv")
    print(table)
    print(f"Saved {out_dir / 'table.md'} and {out_dir / 'table.csv'}")
    return table


def cli(args: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]PATH", help="a results JSON or a directory of them")
    parser.add_argument("--out_dir", type=Path, default=Path("out/table"), help="where table.md and table.csv go")
    parser.add_argument(
        "--metric",
        choices=["acc", "acc_norm"],
        help="report this metric in every column whose task has it (default: each column's Table-1 metric)",
    )
    parsed = parser.parse_args(args)
    try:
        main(parsed.runs, parsed.out_dir, parsed.metric)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)  # bad input, as in the recipes and eval/evaluate.py


if __name__ == "__main__":
    cli()
