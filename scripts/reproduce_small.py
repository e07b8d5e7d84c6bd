"""The paper's accuracy and convergence claims at CPU scale (Tables 1 and 4, Figs. 3, 5, 6 and 8 in miniature).

1. Pretrain the built-in tiny LLaMA-architecture model on the built-in corpus (plain text, not the fine-tuning
   tasks), so that fine-tuning starts from a model that already knows something, as in the paper.
2. Fine-tune it (LoRA and full) with the recipes, same seed and data order for every run, at two learning rates,
   every run with the baseline's FLOPs budget (DropBP and PLD run more steps in it, as in the paper's Fig. 5):
   baseline, PLD (0 -> 0.5; the automatic gamma of dropbp/pld.py: the run averages a 25% FLOPs saving),
   DropBP 0.5 / 0.75 / 0.875 with sensitivity allocation, DropBP 0.875 uniform.
3. Report: validation loss against wall time and against FLOPs (PNG), the time each run needs to reach the
   baseline's final validation loss, held-out accuracy on the built-in tasks through eval/ (best learning rate
   per run, as the paper reports), uniform against sensitivity allocation, and the drop-rate distribution.

    python scripts/reproduce_small.py                 # full size, about 40 minutes on 2 CPU cores
    python scripts/reproduce_small.py --smoke true    # seconds: the same path on a few steps

FLOPs are counted in forward-pass units of the gated blocks per micro-batch: a baseline step costs 1 + k
(k = 2 for full fine-tuning, 1 for LoRA), a DropBP step 1 + k (1 - d) with d the realised FLOPs-weighted drop rate,
a PLD step (1 - d)(1 + k) with d the skipped fraction; embedding and head are left out.
"""

import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from jsonargparse import CLI
from litgpt.args import EvalArgs, TrainArgs

from finetune import full, lora
from finetune.args import DropBPArgs, PLDArgs
from lit_gpt.data import Builtin
from scripts.study_models import pretrain

VARIANTS = {  # name -> (DropBP args, PLD args)
    "baseline": (DropBPArgs(rate=0.0), PLDArgs()),
    "PLD 0->0.5": (DropBPArgs(rate=0.0), PLDArgs(enabled=True)),
    "DropBP 0.5": (DropBPArgs(rate=0.5), PLDArgs()),
    "DropBP 0.75": (DropBPArgs(rate=0.75), PLDArgs()),
    "DropBP 0.875": (DropBPArgs(rate=0.875), PLDArgs()),
    "DropBP 0.875 uniform": (DropBPArgs(rate=0.875, allocation="uniform"), PLDArgs()),
}
RECIPES = {"lora": lora, "full": full}
BACKWARD_FACTOR = {"full": 2.0, "lora": 1.0}


def equal_flops_steps(steps: int, method: str, dropbp: DropBPArgs, pld: PLDArgs) -> int:
    """Steps that cost the baseline's FLOPs: every run gets the same compute budget, as in the paper's Fig. 5
    (DropBP runs more iterations in the same FLOPs). PLD is charged the average saving its automatic gamma is
    solved for (``pld.target_drop``, 25%)."""
    k = BACKWARD_FACTOR[method]
    cost = (1 - pld.target_drop) * (1 + k) if pld.enabled else 1 + k * (1 - dropbp.rate)
    return round(steps * (1 + k) / cost)


def read_log(run_dir: Path, method: str, variant: str) -> dict:
    """Cumulative wall time (training steps + sensitivity pass) and FLOPs at each validation point."""
    rows = {}
    for path in sorted(run_dir.glob("logs/csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows.setdefault(int(float(row["step"])), {}).update({k: v for k, v in row.items() if v != ""})
    k = BACKWARD_FACTOR[method]
    time_s, flops, curve = 0.0, 0.0, []
    for step in sorted(rows):
        row = rows[step]
        time_s += float(row.get("step_time", 0)) + float(row.get("sensitivity_time", 0))
        d = float(row.get("drop_rate", 0))
        flops += (1 - d) * (1 + k) if variant.startswith("PLD") else 1 + k * (1 - d)
        if "val_loss" in row:
            curve.append({"step": step, "time_s": time_s, "flops": flops, "val_loss": float(row["val_loss"])})
    return {"curve": curve, "train_time_s": time_s, "flops": flops}


def heldout_scores(checkpoint_dir: Path, task_dir: Path, limit: Optional[int]) -> dict:
    """Exact match and answer perplexity on the held-out tasks, through eval/ (lm-eval) as eval/evaluate.py runs
    them, less the bootstrap standard errors (never read here; lm-eval runs a process pool for them)."""
    from lm_eval.tasks import TaskManager

    from eval.evaluate import evaluate, tasks_in_path
    from eval.lm_eval_harness import LitGPTLM

    task_manager = TaskManager(include_path=[str(task_dir)], include_defaults=False)
    lm = LitGPTLM.from_checkpoint(checkpoint_dir, batch_size=16, device="cpu")
    results = evaluate(lm, tasks_in_path(task_manager, task_dir), None, None, limit, 16, "cpu", task_manager, 1234,
                       bootstrap_iters=0)["results"]
    return {"exact_match": results["builtin_qa"]["exact_match,none"],
            "answer_perplexity": results["builtin_qa_loglik"]["perplexity,none"]}


def time_to_reach(curve: list, target: float) -> Optional[float]:
    return next((point["time_s"] for point in curve if point["val_loss"] <= target), None)


def plot(runs: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for method in RECIPES:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, run in runs.items():
            if run["method"] != method or run["lr"] != run["best_lr"]:
                continue
            xs = run["log"]["curve"]
            for ax, axis in zip(axes, ("time_s", "flops")):
                ax.plot([p[axis] for p in xs], [p["val_loss"] for p in xs], label=run["variant"])
        axes[0].set_xlabel("training wall time (s)")
        axes[1].set_xlabel("FLOPs (forward units of the blocks per micro-batch)")
        for ax in axes:
            ax.set_ylabel("validation loss")
            ax.legend()
        fig.suptitle(f"{method}: validation loss, best learning rate per run (cf. the paper's Figs. 3 and 5)")
        fig.tight_layout()
        fig.savefig(out_dir / f"val_loss_{method}.png")
        plt.close(fig)


def main(
    out_dir: Path = Path("out/reproduce_small"),
    smoke: bool = False,
    steps: int = 100,
    global_batch_size: int = 16,
    micro_batch_size: int = 8,
    learning_rates: dict = {"lora": [3e-3, 1e-3], "full": [1e-3, 3e-4]},
    num_samples: int = 2000,
    pretrain_steps: int = 400,
    eval_limit: Optional[int] = 100,
    methods: tuple = ("lora", "full"),
    variants: Optional[list] = None,
) -> dict:
    """Run every variant, evaluate, and write report.md, results.json and the plots into out_dir."""
    if smoke:
        steps, pretrain_steps, num_samples, eval_limit, global_batch_size, micro_batch_size = 4, 4, 64, 4, 4, 2
        learning_rates = {m: learning_rates[m][:1] for m in learning_rates}
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = pretrain(out_dir / "pretrained", steps=pretrain_steps, batch_size=16, seq_len=64, lr=3e-3)
    from eval.builtin_task import write_builtin_tasks

    task_dir = out_dir / "builtin_tasks"
    write_builtin_tasks(out_dir=task_dir, num_samples=num_samples)
    base_scores = heldout_scores(base, task_dir, eval_limit)

    runs = {}
    for method in methods:
        for lr in learning_rates[method]:
            for variant in variants or VARIANTS:
                dropbp, pld = VARIANTS[variant]
                run_steps = equal_flops_steps(steps, method, dropbp, pld)  # PLD: gamma solved from run_steps
                run_dir = out_dir / "runs" / f"{method}-lr{lr:g}-{variant.replace(' ', '_').replace('>', '')}"
                if not (run_dir / "final").is_dir():
                    shutil.rmtree(run_dir, ignore_errors=True)
                    RECIPES[method].setup(
                        checkpoint_dir=base, out_dir=run_dir, data=Builtin(num_samples=num_samples),
                        train=TrainArgs(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                        max_steps=run_steps, lr_warmup_steps=max(1, steps // 20), save_interval=None,
                                        log_interval=1, min_lr=0.0),
                        eval=EvalArgs(interval=max(1, steps // 20), max_iters=8),
                        dropbp=dropbp, pld=pld, optimizer={"class_path": "torch.optim.AdamW",
                                                           "init_args": {"lr": lr, "weight_decay": 0.0}},
                        seed=1337,
                    )
                runs[f"{method}|{lr:g}|{variant}"] = {
                    "method": method, "lr": lr, "variant": variant, "dir": str(run_dir), "steps": run_steps,
                    "log": read_log(run_dir, method, variant),
                    "heldout": heldout_scores(run_dir / "final", task_dir, eval_limit),
                }

    # best learning rate per (method, variant) by final validation loss, as the paper reports its best
    for run in runs.values():
        same = [r for r in runs.values() if r["method"] == run["method"] and r["variant"] == run["variant"]]
        run["best_lr"] = min(same, key=lambda r: r["log"]["curve"][-1]["val_loss"])["lr"]
    plot(runs, out_dir)
    for method in methods:
        run_name = f"{method}-lr{learning_rates[method][0]:g}-DropBP_0.875"
        allocation = out_dir / "runs" / run_name / "dropbp_allocation.png"
        if allocation.is_file():
            shutil.copy(allocation, out_dir / f"drop_rates_{method}_0.875.png")
    report = make_report(runs, base_scores, out_dir, time.perf_counter() - t_start)
    (out_dir / "results.json").write_text(json.dumps({"base": base_scores, "runs": runs}, indent=2))
    (out_dir / "report.md").write_text(report)
    print(report)
    return runs


def make_report(runs: dict, base_scores: dict, out_dir: Path, seconds: float) -> str:
    lines = [f"# reproduce_small ({seconds / 60:.1f} min)", "",
             f"Pretrained start, before fine-tuning: exact match {base_scores['exact_match']:.3f}, answer perplexity"
             f" {base_scores['answer_perplexity']:.3g}.", ""]
    for method in RECIPES:
        best = {r["variant"]: r for r in runs.values() if r["method"] == method and r["lr"] == r["best_lr"]}
        if not best:
            continue
        baseline = best.get("baseline")
        target = baseline["log"]["curve"][-1]["val_loss"] if baseline else None
        lines += [f"## {method}", "",
                  "| Run | best lr | steps | final val loss | train time (s) | FLOPs |"
                  " time to baseline's final val loss | speed-up | held-out exact match | answer perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for variant, run in best.items():
            log = run["log"]
            reach = time_to_reach(log["curve"], target) if target is not None else None
            base_time = time_to_reach(baseline["log"]["curve"], target) if baseline else None
            speed = f"{base_time / reach:.2f}x" if reach and base_time else "not reached"
            held = run["heldout"] or {}
            lines.append(
                f"| {variant} | {run['lr']:g} | {run['steps']} | {log['curve'][-1]['val_loss']:.4f} |"
                f" {log['train_time_s']:.1f} |"
                f" {log['flops']:.0f} | {'–' if reach is None else f'{reach:.1f}'} | {speed} |"
                f" {held.get('exact_match', float('nan')):.3f} | {held.get('answer_perplexity', float('nan')):.3g} |"
            )
        lines.append("")
        if "DropBP 0.875" in best and "DropBP 0.875 uniform" in best:
            s, u = best["DropBP 0.875"], best["DropBP 0.875 uniform"]
            lines += [f"Uniform vs sensitivity allocation at p = 0.875 (Table 4 analogue): final val loss"
                      f" {u['log']['curve'][-1]['val_loss']:.4f} (uniform) vs {s['log']['curve'][-1]['val_loss']:.4f}"
                      " (sensitivity); held-out exact match"
                      f" {(u['heldout'] or {}).get('exact_match', float('nan')):.3f}"
                      f" vs {(s['heldout'] or {}).get('exact_match', float('nan')):.3f}.", ""]
    lines.append(f"Plots: {', '.join(p.name for p in sorted(out_dir.glob('*.png')))}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    CLI(main, as_positional=False)
