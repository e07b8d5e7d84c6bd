"""The sensitivity pass of a run (the paper's Alg. 1 on a fixed probe batch) and the re-allocation of the drop rates,
with its report (``dropbp_allocation.json`` and ``.png``, like the paper's Figs. 6a and 8)."""

import json
import os
import time
from pathlib import Path

import torch
from lightning.fabric.strategies import FSDPStrategy

from dropbp import allocate_rates, compute_sensitivity
from finetune.cli import UsageError
from finetune.out_dir import atomic_write_text
from lit_gpt.gated import set_gate_flops


def probe_batch(train_loader, size: int, fabric) -> dict:
    """A fixed batch of training samples for the sensitivity pass (drawn apart from the training order, so the
    data the run trains on is the same with or without the pass)."""
    dataset = train_loader.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1234)).tolist()[:size]
    batch = train_loader.collate_fn([dataset[i] for i in order])
    return {k: v.to(fabric.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def allocate(fabric, model, handler, probe_loss, seq_len: int, dropbp, metric, out_dir, step: int, write=print) -> None:
    """Measure each branch's sensitivity on the probe batch (``probe_loss()``: its loss; ``seq_len``: its length, at
    which the branches' FLOPs are weighed) and re-allocate the drop rates to meet ``--dropbp.rate``."""
    t0 = time.perf_counter()
    handler.touch_dropped(fabric.world_size > 1)  # each probe reduces its gradients, as a step's last micro-batch
    try:
        sensitivity = compute_sensitivity(handler, model, probe_loss, metric=metric, backward=fabric.backward)
    finally:
        handler.touch_dropped(False)
    # Every rank probes the same batch. Under DDP the probe gradients are averaged, so the sensitivities agree; under
    # FSDP each rank holds a shard of every gradient, and the shards' parts add up ("gradnorm" then takes the norm
    # of each shard of a tensor rather than of the whole tensor).
    if isinstance(fabric.strategy, FSDPStrategy):
        sensitivity = fabric.all_reduce(sensitivity, reduce_op="sum").cpu()
    if not torch.isfinite(sensitivity).all():
        raise UsageError(f"non-finite sensitivity in the pass after step {step} (the probe's loss or gradients"
                         " diverged): stopping; the checkpoints saved so far are intact")
    # weigh the branches at the length this run trains on, not the model's context (attention grows as s^2)
    set_gate_flops(getattr(model, "module", model), seq_len)
    rates = allocate_rates(
        sensitivity.tolist(), handler.flops.tolist(), dropbp.rate, dropbp.step, dropbp.max_rate, dropbp.min_rate
    )
    rates = fabric.broadcast(rates, src=0)  # one allocation everywhere, even if rounding split a tie differently
    handler.set_rates(rates)
    handler.allocated = True
    write(
        f"Sensitivity pass ({metric}, {len(handler.gates)} branches, {time.perf_counter() - t0:.1f}s): rates"
        f" re-allocated, FLOPs-weighted mean {handler.mean_rate:.3f} (target {dropbp.rate})"
    )
    if fabric.global_rank == 0:
        report = {
            "metric": metric, "target_rate": dropbp.rate, "mean_rate": handler.mean_rate,
            "branches": [
                {"layer": g.layer, "kind": g.kind, "flops": g.flops, "sensitivity": s, "rate": r}
                for g, s, r in zip(handler.gates, sensitivity.tolist(), rates)
            ],
        }
        atomic_write_text(out_dir / "dropbp_allocation.json", json.dumps(report, indent=2))
        plot_allocation(report, out_dir / "dropbp_allocation.png")


def plot_allocation(report: dict, path: Path) -> None:
    """Sensitivity and drop rate per branch, like the paper's Figs. 6a and 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for kind, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
        rows = [b for b in report["branches"] if b["kind"] == kind]
        ax1.bar([b["layer"] + (0.2 if kind == "mlp" else -0.2) for b in rows], [b["sensitivity"] for b in rows],
                width=0.4, color=color, label=kind)
        ax2.bar([b["layer"] + (0.2 if kind == "mlp" else -0.2) for b in rows], [b["rate"] for b in rows],
                width=0.4, color=color, label=kind)
    ax1.set_ylabel(f"sensitivity ({report['metric']})")
    ax2.set_ylabel("drop rate")
    ax2.set_xlabel("layer")
    ax2.set_title(f"target {report['target_rate']}, FLOPs-weighted mean {report['mean_rate']:.3f}")
    ax1.legend()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.09, top=0.93, hspace=0.2)  # fixed: tight_layout draws twice
    fig.savefig(path.with_suffix(".tmp.png"))
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)
