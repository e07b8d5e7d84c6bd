"""The DropBP paper's Table 1: which lm-eval tasks fill each column, and how lm-eval results become table rows.

Every column header states its few-shot setting and metric, e.g. ``PIQA (0-shot acc_norm)``. acc, acc_norm and
exact_match are shown in percent; other metrics (perplexities) as lm-eval reports them.
"""

from dataclasses import dataclass
from typing import Optional

PERCENT_METRICS = ("acc", "acc_norm", "exact_match")


@dataclass(frozen=True)
class Column:
    header: str
    task: str  # the lm-eval task or group whose score fills the column
    metric: str  # reported unless another metric is asked for and the task has it


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]  # what lm-eval runs
    num_fewshot: int
    columns: tuple[Column, ...]
    average: Optional[str] = None  # header of a column holding the mean of the others, if any


PRESETS = {
    # lm-eval's MMLU groups average their subjects weighted by size, the overall `mmlu` group included
    "mmlu": Preset(
        tasks=("mmlu",),
        num_fewshot=5,
        columns=(
            Column("MMLU Humanities", "mmlu_humanities", "acc"),
            Column("MMLU STEM", "mmlu_stem", "acc"),
            Column("MMLU Social Sciences", "mmlu_social_sciences", "acc"),
            Column("MMLU Other", "mmlu_other", "acc"),
            Column("MMLU Average", "mmlu", "acc"),
        ),
    ),
    # acc_norm (length-normalised) by default, as commonly reported for these tasks; WinoGrande has acc only
    "commonsense": Preset(
        tasks=("piqa", "hellaswag", "arc_challenge", "arc_easy", "openbookqa", "winogrande"),
        num_fewshot=0,
        columns=(
            Column("PIQA", "piqa", "acc_norm"),
            Column("HellaSwag", "hellaswag", "acc_norm"),
            Column("ARC-c", "arc_challenge", "acc_norm"),
            Column("ARC-e", "arc_easy", "acc_norm"),
            Column("OBQA", "openbookqa", "acc_norm"),
            Column("WinoGrande", "winogrande", "acc"),
        ),
        average="Commonsense Average",
    ),
}


def metric_key(scores: dict, metric: Optional[str], default: Optional[str]) -> str:
    """The ``metric,filter`` key of a task's scores to report: ``metric`` if the task has it, else ``default``,
    else acc, else its first metric."""
    keys = [k for k, v in scores.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    for wanted in (metric, default, "acc"):
        for key in keys:
            if key.split(",")[0] == wanted:
                return key
    return keys[0]


def first_metric(scores: dict) -> str:
    """The metric a task lists first (its headline: perplexity for the built-in log-likelihood task)."""
    return next(k.split(",")[0] for k, v in scores.items() if "," in k and "_stderr" not in k)


def cell(results: dict, task: str, header: str, metric: Optional[str], default: Optional[str]) -> tuple[str, float]:
    key = metric_key(results["results"][task], metric, default)
    name, filter_name = key.split(",")
    value = results["results"][task][key]
    value = 100 * value if name in PERCENT_METRICS else value
    return f"{header} ({shots(results, task)}-shot {name if filter_name == 'none' else key})", value


def shots(results: dict, task: str):
    """A task's few-shot setting; a group's is its members' when they agree. lm-eval 0.4.13 records it for a group
    of tasks but not for a group of groups (``mmlu``, the MMLU average)."""
    if task in results.get("n-shot", {}):
        return results["n-shot"][task]
    members = {shots(results, member) for member in results.get("group_subtasks", {}).get(task, [])}
    return members.pop() if len(members) == 1 else "?"


def table_row(results: dict, metric: Optional[str] = None) -> dict[str, float]:
    """The Table-1 columns of one lm-eval results dict, header -> score: the columns of every preset whose
    tasks all have scores, then one column per other task or group evaluated (a group's members are left out)."""
    scores = results["results"]
    row, shown = {}, set()
    for preset in PRESETS.values():
        if not all(column.task in scores for column in preset.columns):
            continue
        cells = [cell(results, c.task, c.header, metric, c.metric) for c in preset.columns]
        row.update(cells)
        if preset.average:
            row[preset.average] = sum(value for _, value in cells) / len(cells)
        shown.update(column.task for column in preset.columns)
    members = {task for subtasks in results.get("group_subtasks", {}).values() for task in subtasks}
    for task in scores:
        if task not in shown and task not in members:  # a task of its own: its first (headline) metric
            header, value = cell(results, task, task, metric, first_metric(scores[task]))
            row[header] = value
    return row


def column_rank(header: str) -> int:
    """Presets' columns first, in Table-1 order, then the others."""
    for rank, preset in enumerate(PRESETS.values()):
        if header.split(" (")[0] in [c.header for c in preset.columns] + [preset.average]:
            return rank
    return len(PRESETS)


def table_headers(rows: dict[str, dict[str, float]]) -> list[str]:
    headers = list(dict.fromkeys(header for row in rows.values() for header in row))
    return sorted(headers, key=column_rank)  # stable: each preset keeps its own column order


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """One line per run (label -> row); a run without some column shows '-' there."""
    headers = table_headers(rows)
    lines = ["| Run | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for label, row in rows.items():
        cells = [f"{row[header]:.2f}" if header in row else "-" for header in headers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
