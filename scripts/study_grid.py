"""The runs of scripts/lora_study.py: what each one is (`Job`), the grid and the ablations, running one run through
the recipes (`run_job`), and the time estimate from measured step times (`estimate_seconds`)."""

import contextlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from litgpt.args import EvalArgs, TrainArgs

from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.data import Builtin
from scripts.reproduce_small import RECIPES, equal_flops_steps, heldout_scores, read_log

# name -> what the ablation changes: DropBP options, recipe options, and whether the change also applies to the
# baseline (then it gets its own baseline; else the main grid's baseline of the same seed is the reference)
ABLATIONS = {
    "uniform allocation": {"dropbp": {"allocation": "uniform"}, "recipe": {}, "own_baseline": False},
    "lr compensation": {"dropbp": {"lr_compensation": True}, "recipe": {}, "own_baseline": False},
    "rank 32": {"dropbp": {}, "recipe": {"lora_r": 32, "lora_alpha": 64}, "own_baseline": True},
    "attention only": {"dropbp": {}, "recipe": {"lora_projection": False, "lora_mlp": False}, "own_baseline": True},
    "q, v only": {"dropbp": {}, "recipe": {"lora_key": False, "lora_projection": False, "lora_mlp": False},
                  "own_baseline": True},  # litgpt's default LoRA targets
    "cap 0.95": {"dropbp": {"max_rate": 0.95}, "recipe": {}, "own_baseline": False},
}
EQUAL_STEPS, EQUAL_FLOPS, BASELINE = "equal steps", "equal FLOPs", "baseline"


@dataclass
class Settings:
    """What every fine-tuning run shares."""

    steps: int = 100
    """Optimizer steps of a baseline run (and of every equal-steps run)"""
    global_batch_size: int = 16
    micro_batch_size: int = 8
    learning_rates: dict = field(default_factory=lambda: {"lora": 3e-3, "full": 3e-4})
    """LoRA: the best of two in scripts/reproduce_small.py (BENCHMARKS.md, 2026-11-30). Full: that run's 1e-3
    overfits here (the validation loss is lowest mid-run and, at L, ends about where it started), 3e-4 does not"""
    rates: tuple = (0.5, 0.875)
    seeds: tuple = (0, 1, 2)
    num_samples: int = 2000
    eval_points: int = 10
    """Validations during a baseline run, each on the whole validation set (5% of num_samples), plus one before"""
    mask_prompt: bool = True
    """Loss on the answer tokens only: with the prompt's template in it, the loss mostly measures a template the
    pretrained model already knows, and moved by 0.03 over a whole fine-tuning run (first grid, 2026-12-06)"""
    eval_limit: Optional[int] = None
    """Held-out questions scored (None: all of them, about 10% of num_samples)"""


@dataclass(frozen=True)
class Job:
    size: str
    method: str
    rate: float
    protocol: str  # BASELINE, EQUAL_STEPS or EQUAL_FLOPS
    seed: int
    steps: int
    ablation: str = ""

    @property
    def variant(self) -> str:
        return "baseline" if self.rate == 0 else f"DropBP {self.rate:g}"

    @property
    def name(self) -> str:
        parts = [self.size, self.method, self.variant, self.protocol, self.ablation, f"seed{self.seed}"]
        return "-".join(p.replace(" ", "_") for p in parts if p and not (self.rate == 0 and p == BASELINE))


@dataclass
class SeededBuiltin(Builtin):
    """The built-in data with the run's seed deciding the training order (Builtin's order follows its data seed
    alone): the three seeds then differ in data order, not only in LoRA init, dropout and drop decisions."""

    shuffle_seed: int = 0

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.generator.manual_seed(self.shuffle_seed)  # the sampler draws from this very generator
        return loader


def dropbp_args(job: Job) -> DropBPArgs:
    return DropBPArgs(rate=job.rate, **ABLATIONS.get(job.ablation, {}).get("dropbp", {}))


def grid(sizes: list, methods: tuple, settings: Settings) -> list:
    """Per size, method and seed: the baseline, and every rate at equal steps and at the baseline's FLOPs."""
    jobs = []
    for size in sizes:
        for method in methods:
            for seed in settings.seeds:
                jobs.append(Job(size, method, 0.0, BASELINE, seed, settings.steps))
                for rate in settings.rates:
                    flops_steps = equal_flops_steps(settings.steps, method, DropBPArgs(rate=rate), PLDArgs())
                    jobs.append(Job(size, method, rate, EQUAL_STEPS, seed, settings.steps))
                    jobs.append(Job(size, method, rate, EQUAL_FLOPS, seed, flops_steps))
    return jobs


def ablation_jobs(size: str, ablations: list, rate: float, settings: Settings) -> list:
    """LoRA at the paper's protocol (equal steps), one change at a time, every seed."""
    jobs = []
    for name in ablations:
        for seed in settings.seeds:
            if ABLATIONS[name]["own_baseline"]:
                jobs.append(Job(size, "lora", 0.0, BASELINE, seed, settings.steps, name))
            jobs.append(Job(size, "lora", rate, EQUAL_STEPS, seed, settings.steps, name))
    return jobs


def run_job(job: Job, checkpoint_dir: Path, task_dir: Path, run_root: Path, settings: Settings) -> dict:
    """One fine-tuning run and its held-out evaluation; a finished run's result.json is reused when it was made with
    the same settings (the run's name holds the job, not the learning rates or the data)."""
    run_dir = Path(run_root) / job.name
    shared = run_settings(job, settings)
    found = cached_result(run_dir, shared)
    if found is not None:
        return found
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    interval = max(1, settings.steps // settings.eval_points)
    t0 = time.perf_counter()
    with open(run_dir / "output.txt", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        data = SeededBuiltin(num_samples=settings.num_samples, mask_prompt=settings.mask_prompt, shuffle_seed=job.seed)
        RECIPES[job.method].setup(
            checkpoint_dir=checkpoint_dir, out_dir=run_dir, data=data,
            train=TrainArgs(global_batch_size=settings.global_batch_size, micro_batch_size=settings.micro_batch_size,
                            max_steps=job.steps, lr_warmup_steps=max(1, settings.steps // 20), save_interval=None,
                            log_interval=1, min_lr=0.0),
            eval=EvalArgs(interval=interval, max_iters=sys.maxsize, initial_validation=True),
            dropbp=dropbp_args(job), pld=PLDArgs(),
            optimizer={"class_path": "torch.optim.AdamW",
                       "init_args": {"lr": settings.learning_rates[job.method], "weight_decay": 0.0}},
            seed=job.seed, **ABLATIONS.get(job.ablation, {}).get("recipe", {}),
        )
        wall = time.perf_counter() - t0
        log = read_log(run_dir, job.method, job.variant)
        heldout = heldout_scores(run_dir / "final", task_dir, settings.eval_limit)
    shutil.rmtree(run_dir / "final", ignore_errors=True)  # 100 runs x a model: keep the logs and result only
    result = {**asdict(job), "variant": job.variant, "name": job.name, "curve": log["curve"], "flops": log["flops"],
              "train_time_s": log["train_time_s"], "final_val_loss": log["curve"][-1]["val_loss"],
              "heldout": {k: float(v) for k, v in heldout.items()}, "step_time": median_step_time(run_dir),
              "wall_s": time.perf_counter() - t0, "overhead_s": wall - log["train_time_s"], "settings": shared}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return {**result, "cached": False}


def run_settings(job: Job, settings: Settings) -> dict:
    """What of ``settings`` shapes this run (not the grid's rates and seeds, nor the other method's rate), as
    result.json holds it."""
    shaping = {k: v for k, v in asdict(settings).items() if k not in ("rates", "seeds", "learning_rates")}
    return json.loads(json.dumps({**shaping, "learning_rate": settings.learning_rates[job.method]}))


def cached_result(run_dir: Path, shared: dict) -> Optional[dict]:
    """The finished run's result when its settings are ``shared``, else None (then it runs again)."""
    path = Path(run_dir) / "result.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    return {**found, "cached": True} if found.get("settings") == shared else None


def median_step_time(run_dir: Path) -> float:
    import csv

    times = [float(row["step_time"]) for path in sorted(run_dir.glob("logs/csv/version_*/metrics.csv"))
             for row in csv.DictReader(open(path)) if row.get("step_time")]
    return statistics.median(times[2:] or times)  # the first steps warm up


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def step_model(calibration: list) -> dict:
    """(size, method) -> {rate: (seconds per step, seconds of overhead per run)} from finished runs."""
    model = {}
    for r in calibration:
        model.setdefault((r["size"], r["method"]), {})[r["rate"]] = (r["step_time"], r["wall_s"] - r["train_time_s"])
    return model


def job_seconds(job: Job, model: dict) -> float:
    """Step time linear in the rate between the measured rates (as the backward FLOPs are), plus the overhead."""
    measured = model[(job.size, job.method)]
    rates = sorted(measured)
    lo = max([r for r in rates if r <= job.rate], default=rates[0])
    hi = min([r for r in rates if r >= job.rate], default=rates[-1])
    w = 0.0 if hi == lo else (job.rate - lo) / (hi - lo)
    step, overhead = ((1 - w) * a + w * b for a, b in zip(measured[lo], measured[hi]))
    return job.steps * step + overhead  # ablations timed as the main grid's run (rank 32: a few % more)


def estimate_seconds(jobs: list, calibration: list, workers: int) -> float:
    """Wall time of ``jobs`` on ``workers`` parallel single-threaded workers, from the calibration runs."""
    model = step_model(calibration)
    return sum(job_seconds(job, model) for job in jobs) / max(1, workers)


def calibration_jobs(jobs: list) -> list:
    """The first seed's baseline and highest-rate equal-steps run of every size and method: they time the rest."""
    top = max(j.rate for j in jobs)
    first = min(j.seed for j in jobs)
    return [j for j in jobs if not j.ablation and j.seed == first and j.protocol in (BASELINE, EQUAL_STEPS)
            and j.rate in (0.0, top)]

