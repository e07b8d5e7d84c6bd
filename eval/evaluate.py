"""Evaluate a Lit-GPT checkpoint with lm-evaluation-harness and write its row of the DropBP paper's Table 1.

    python eval/evaluate.py --checkpoint_dir out/lora-dropbp/final --tasks mmlu
    python eval/evaluate.py --checkpoint_dir out/lora-dropbp/final --tasks commonsense
    python eval/evaluate.py --checkpoint_dir out/lora-dropbp/final --tasks piqa,my_tasks/qa.yaml --limit 100

Presets: ``mmlu`` (5-shot; Humanities, STEM, Social Sciences, Other, Average; acc) and ``commonsense`` (0-shot;
PIQA, HellaSwag, ARC-c, ARC-e, OBQA, WinoGrande and their mean; acc_norm, acc for WinoGrande). Writes lm-eval's
results JSON and the markdown row to --out_dir; eval/make_table.py puts several runs in one table.
"""

import difflib
import functools
import json
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional

if __name__ == "__main__":
    # `python eval/evaluate.py` puts eval/ first on sys.path, where this file would shadow Hugging Face's
    # `evaluate` (which some lm-eval tasks import): import from the repository root instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import lm_eval
import lm_eval.evaluator
import torch
from jsonargparse import CLI
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from eval.lm_eval_harness import CheckpointError, LitGPTLM, check_checkpoint_dir
from eval.presets import PRESETS, Preset, markdown_table, table_row

LM_EVAL_ENV_INFO = lm_eval.evaluator.add_env_info  # lm-eval's own, put back after each evaluation


class InputError(Exception):
    """A command-line value that cannot be evaluated; the message says why."""


class EvaluationError(Exception):
    """A failure while evaluating (a data set that cannot be fetched, ...); the message says why."""


def split_tasks(tasks: str) -> tuple[Optional[Preset], list[str], list[Path]]:
    """--tasks as (preset, lm-eval task names, local task YAML files or directories)."""
    items = [item.strip() for item in tasks.split(",") if item.strip()]
    if not items:
        raise InputError("--tasks is empty")
    if any(item in PRESETS for item in items):
        if len(items) > 1:
            raise InputError(f"run a preset on its own (--tasks {' / --tasks '.join(PRESETS)}), got --tasks {tasks}")
        preset = PRESETS[items[0]]
        return preset, list(preset.tasks), []
    is_path = [Path(item).exists() or item.endswith((".yaml", ".yml")) for item in items]
    paths = [Path(item) for item, path in zip(items, is_path) if path]
    for path in paths:
        if not path.exists():
            raise InputError(f"task file not found: {path}")
    return None, [item for item, path in zip(items, is_path) if not path], paths


def tasks_in_path(task_manager: TaskManager, path: Path) -> list[str]:
    """The tasks a local YAML file defines (or its group), or every task the YAML files of a directory define."""
    path = path.resolve()
    names = task_manager.all_subtasks if path.is_dir() else task_manager.all_subtasks + task_manager.all_groups
    found = []
    for name in names:
        yaml_path = task_manager.task_index[name].yaml_path
        if yaml_path is not None and (Path(yaml_path).resolve() == path or path in Path(yaml_path).resolve().parents):
            found.append(name)
    if not found:
        raise InputError(f"no lm-eval task defined in {path}")
    return found


def check_task_names(task_manager: TaskManager, names: list[str]) -> None:
    for name in names:
        if name not in task_manager.all_tasks:
            close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(f"unknown lm-eval task: {name}{hint}")


def main(
    checkpoint_dir: Path,
    tasks: str,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    metric: Optional[Literal["acc", "acc_norm"]] = None,
    out_dir: Optional[Path] = None,
    seed: int = 1234,
) -> dict:
    """Evaluate a checkpoint on a Table-1 preset or on any lm-eval tasks.

    Args:
        checkpoint_dir: A Lit-GPT checkpoint: lit_model.pth (LoRA or adapter weights merged in),
            model_config.yaml and the tokenizer files.
        tasks: A preset, ``mmlu`` or ``commonsense``; or comma-separated lm-eval task names and local task YAML
            files (a file's task or group) or directories (every task their YAML files define).
        num_fewshot: Few-shot examples per question (default: the preset's; else each task's own, else 0).
        limit: Evaluate at most this many examples per task (a fraction of them if below 1), for quick checks.
        batch_size: Sequences per forward pass when scoring.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: cuda when there is a GPU).
        precision: Weights and compute dtype (default: bf16-true on GPUs that have bf16, else 16-true; 32-true on
            CPU).
        metric: Report this metric in every column whose task has it (default: acc for MMLU, which has acc
            only; acc_norm for the commonsense tasks, acc for WinoGrande, which has no acc_norm). Each column
            header names the metric it shows.
        out_dir: Where results_<tasks>.json (lm-eval's results) and table_<tasks>.md go (default:
            <checkpoint_dir>/eval).
        seed: lm-eval's random seed (few-shot example sampling).
    """
    check_checkpoint_dir(checkpoint_dir)
    preset, names, paths = split_tasks(tasks)
    if batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {batch_size}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda, but PyTorch sees no GPU: use --device cpu")

    # lm-eval's own tasks are indexed only when asked for (indexing them takes seconds)
    include_paths = [str(path if path.is_dir() else path.parent) for path in paths]
    task_manager = TaskManager(include_path=include_paths or None, include_defaults=bool(names))
    check_task_names(task_manager, names)
    selected = names + [name for path in paths for name in tasks_in_path(task_manager, path)]

    lm = LitGPTLM.from_checkpoint(checkpoint_dir, batch_size=batch_size, device=device, precision=precision)
    try:
        results = evaluate(lm, selected, preset, num_fewshot, limit, batch_size, device, task_manager, seed)
    except (OSError, RuntimeError, ConnectionError) as error:
        if not names:
            raise
        # lm-eval fetches its tasks' data sets from the Hugging Face hub on first use
        dataset = hub_dataset(error)
        raise EvaluationError(
            f"the data of {', '.join(names)}{f' (Hugging Face data set {dataset})' if dataset else ''} could not be"
            f" loaded ({type(error).__name__}: {first_line(error)}): lm-eval downloads it from the Hugging Face hub"
            " on first use; offline, run with HF_DATASETS_OFFLINE=1 and a Hugging Face cache (HF_HOME) that holds it,"
            " filled by the same command on a machine with internet, or use local task YAMLs"
        ) from None
    results["config"]["checkpoint_dir"] = str(checkpoint_dir)

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))

    run_name = "-".join(Path(item.strip()).stem for item in tasks.split(",") if item.strip())
    out_dir = out_dir or checkpoint_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, table_path = out_dir / f"results_{run_name}.json", out_dir / f"table_{run_name}.md"
    results_path.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    table = markdown_table({str(checkpoint_dir): table_row(results, metric)})
    table_path.write_text(table + "\n")
    print(table)
    print(f"Saved lm-eval's results to {results_path} and the table row to {table_path}")
    return results


@functools.cache
def environment_info() -> dict:
    """What lm-eval records of the environment in every result. It runs pip and other programs for it (torch's
    collect_env: half a second a call, more than a small model's evaluation), so it is taken once per process."""
    info = {}
    LM_EVAL_ENV_INFO(info)
    return info


@contextmanager
def environment_recorded_once():
    lm_eval.evaluator.add_env_info = lambda results: results.update(environment_info())
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = LM_EVAL_ENV_INFO


def evaluate(lm, selected, preset, num_fewshot, limit, batch_size, device, task_manager, seed,
             bootstrap_iters: int = 100000) -> dict:
    """lm-eval on ``selected``; ``bootstrap_iters`` 0 skips the standard errors (lm-eval bootstraps them on a
    process pool, about a second per call on a small model)."""
    with environment_recorded_once():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=selected,
            num_fewshot=preset.num_fewshot if preset and num_fewshot is None else num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=task_manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
        )


def hub_dataset(error: BaseException) -> Optional[str]:
    """The data set lm-eval was loading when ``error`` was raised, as ``path`` or ``path, subset name``: the error
    itself, from deep in the hub client, does not say; the task whose ``download`` failed does."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        task = frame.f_locals.get("self")
        if frame.f_code.co_name == "download" and getattr(task, "DATASET_PATH", None):
            return task.DATASET_PATH + (f", subset {task.DATASET_NAME}" if getattr(task, "DATASET_NAME", None) else "")
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def cli(args: Optional[list[str]] = None) -> None:
    """Exit statuses as the fine-tuning recipes': 2 bad input, 3 a failure while evaluating (one line each)."""
    try:
        CLI(main, as_positional=False, args=args)
    except (CheckpointError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    cli()
