"""Does DropBP keep LoRA's accuracy? (issue 21) The paper's protocol and ours, three seeds, three model sizes.

    python scripts/lora_study.py                        # everything, aimed at under 90 minutes on 2 CPU cores
    python scripts/lora_study.py --estimate_only true   # pretrain (or load), time the calibration runs, estimate
    python scripts/lora_study.py --quick true           # the same path on tiny sizes and a few steps

1. Pretrain (or load from --cache_dir, keyed by size and pretraining settings) three sizes (study_models.SIZES), on
   the plain corpus mixed with train-split instruction examples, each long enough to reach a plateau: fine-tuning
   then adjusts a model that knows the format instead of teaching it (the report shows the plateau and the held-out
   scores before fine-tuning).
2. At each size, for LoRA and full fine-tuning and three seeds (data order, LoRA init, dropout, drop decisions):
   the baseline, and DropBP 0.5 and 0.875 both at the baseline's number of optimizer steps (the paper's protocol:
   DropBP only makes the steps cheaper) and at the baseline's FLOPs (more, cheaper steps; scripts/reproduce_small.py).
3. Ablations on the LoRA gap at the middle size, equal steps, p = 0.875: uniform allocation, lr compensation,
   rank 32 and LoRA on q, v only (litgpt's default targets), these two against their own baselines; more in
   study_grid.ABLATIONS.
4. Measured per run: the validation loss on the answers (`Settings.mask_prompt`: the prompt's template, which the
   pretrained model already knows, would otherwise be most of it) of validation questions never trained on, on the
   whole validation set before training and at every validation; and on the held-out questions, through eval/
   (lm-eval, reproduce_small's `heldout_scores`), the answer's negative log-likelihood and generated exact match.
   results.json, report.md (mean ± sd over seeds, the gap to the same seed's baseline, the share of the baseline's
   fall in loss kept), loss curves with min-max bands and the scale trend (PNG).

The budget: each run is single-threaded and --workers 2 runs go at once (2 cores; models of 0.3-6M parameters keep
two threads busy poorly, so two runs at once finish more runs per minute than one run on two threads). Runs of one
size and method share their per-step time, so the first seed's baseline and DropBP 0.875 runs of each size and
method run first, and the rest is estimated from their measured step times and overheads (evaluation included),
printed before it starts (rates in between: linear in the rate). Measured on 2 cores, 2026-12-06: pretraining the
three sizes 11.5 min (S 0.7, M 3.3, L 10.6 min, two at a time; once: cached), then 102 runs 52 min (estimated
47 min after the 5.7-min calibration), and the 6 runs of the q, v ablation added later about 2 min: about 66 min
from cold. --settings.steps, --sizes and --ablations shrink it.
"""

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch
from jsonargparse import CLI

from eval.builtin_task import write_builtin_tasks
from scripts.reproduce_small import heldout_scores
from scripts.study_grid import Settings, ablation_jobs, calibration_jobs, estimate_seconds, grid, run_job, set_threads
from scripts.study_models import QUICK_SIZES, SIZES, PretrainArgs, ensure_pretrained, n_params, size_config
from scripts.study_report import write_report

PRETRAIN = PretrainArgs(steps={"S": 600, "M": 800, "L": 1000})
QUICK_SETTINGS = Settings(steps=3, global_batch_size=4, micro_batch_size=2, rates=(0.875,), num_samples=64,
                          eval_points=1, eval_limit=3)
QUICK_PRETRAIN = PretrainArgs(steps={"S": 3, "M": 3, "L": 3}, corpus_size=100)
QUICK_ABLATIONS = ["uniform allocation", "lr compensation"]  # ~1 s per run, mostly lm-eval: the two cheapest


def parallel(fn, calls: list, workers: int, threads: int) -> list:
    """fn(*args) for each args in calls: in this process when workers <= 1, else on that many spawned processes."""
    if workers <= 1:
        return [fn(*args) for args in calls]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=set_threads,
                             initargs=(threads,)) as pool:
        return list(pool.map(fn, *zip(*calls))) if calls else []


def prepare_models(shapes: dict, cache_dir: Path, pretrain: PretrainArgs, workers: int, threads: int) -> dict:
    """size -> checkpoint dir, whether pretrained now, parameters and the pretraining summary."""
    names = list(shapes)
    found = parallel(ensure_pretrained, [(cache_dir, n, *shapes[n], pretrain) for n in names], workers, threads)
    return {n: {"dir": str(d), "created": created, "shape": "{} x {}".format(*shapes[n]),
                "params": n_params(size_config(*shapes[n])),
                "pretrain": json.loads((Path(d) / "pretrain.json").read_text())}
            for n, (d, created) in zip(names, found)}


def main(
    out_dir: Path = Path("out/lora_study"),
    cache_dir: Path = Path("out/study_models"),
    quick: bool = False,
    sizes: Optional[list] = None,
    methods: tuple = ("lora", "full"),
    settings: Settings = Settings(),
    pretrain: PretrainArgs = PRETRAIN,
    ablations: list = ["uniform allocation", "lr compensation", "rank 32", "q, v only"],
    ablation_size: str = "M",
    ablation_rate: float = 0.875,
    workers: int = 2,
    threads: int = 1,
    estimate_only: bool = False,
) -> dict:
    """Run the study (see the module docstring); returns the contents of results.json."""
    if quick:
        settings, pretrain, workers, ablations = QUICK_SETTINGS, QUICK_PRETRAIN, 0, QUICK_ABLATIONS
    shapes = {n: s for n, s in (QUICK_SIZES if quick else SIZES).items() if sizes is None or n in sizes}
    torch.set_num_threads(threads)
    out_dir, cache_dir = Path(out_dir).resolve(), Path(cache_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    models = prepare_models(shapes, cache_dir, pretrain, workers, threads)
    t_pretrain = time.perf_counter() - t_start
    print(f"Models ready in {t_pretrain:.0f} s: " + ", ".join(
        f"{n} {m['shape']} ({m['params'] / 1e6:.2f}M, {'pretrained now' if m['created'] else 'from the cache'})"
        for n, m in models.items()))
    task_dir = out_dir / "builtin_tasks"
    write_builtin_tasks(out_dir=task_dir, num_samples=settings.num_samples)
    for m in models.values():
        m["base"] = {k: float(v) for k, v in heldout_scores(Path(m["dir"]), task_dir, settings.eval_limit).items()}

    jobs = grid(list(shapes), methods, settings)
    if ablation_size in shapes and "lora" in methods:
        jobs += ablation_jobs(ablation_size, ablations, ablation_rate, settings)
    run_root = out_dir / "runs"
    call = lambda js: [(j, Path(models[j.size]["dir"]), task_dir, run_root, settings) for j in js]  # noqa: E731
    first = calibration_jobs(jobs)
    t0 = time.perf_counter()
    calibration = parallel(run_job, call(first), workers, threads)
    t_calibration = time.perf_counter() - t0
    rest = [j for j in jobs if j not in first]
    estimate = estimate_seconds(rest, calibration, max(1, workers))
    print(f"{len(jobs)} runs. Pretraining {t_pretrain / 60:.1f} min, calibration ({len(first)} runs)"
          f" {t_calibration / 60:.1f} min, the other {len(rest)} runs estimated at {estimate / 60:.1f} min on"
          f" {max(1, workers)} worker(s): {(t_pretrain + t_calibration + estimate) / 60:.1f} min in all"
          " (runs already in out_dir are counted although they will be reused)")
    for r in calibration:
        print(f"  {r['name']}: {r['steps']} steps, {r['step_time']:.3f} s/step, overhead"
              f" {r['wall_s'] - r['train_time_s']:.1f} s{' (cached)' if r['cached'] else ''}")
    results = calibration if estimate_only else calibration + parallel(run_job, call(rest), workers, threads)
    seconds = time.perf_counter() - t_start
    header = [f"# LoRA study ({seconds / 60:.1f} min{', quick' if quick else ''})", "",
              f"    python scripts/lora_study.py{' --quick true' if quick else ''}", "",
              f"Baseline steps {settings.steps}, global batch {settings.global_batch_size}, learning rates"
              f" {settings.learning_rates}, seeds {list(settings.seeds)}; {workers} worker(s) x {threads} thread(s)."
              f" Estimated before the grid: {(t_pretrain + t_calibration + estimate) / 60:.1f} min."]
    summary = {"models": models, "settings": settings.__dict__, "estimate_s": t_pretrain + t_calibration + estimate,
               "seconds": seconds, "calibration": [r["name"] for r in calibration], "runs": results}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    if not estimate_only:
        print(write_report(results, models, out_dir, ablation_size, header))
    return summary


if __name__ == "__main__":
    CLI(main, as_positional=False)
