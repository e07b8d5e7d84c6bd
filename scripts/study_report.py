"""Tables and plots of scripts/lora_study.py from its results: mean ± sd over seeds, and the gap to the baseline of
the same seed (DropBP minus baseline, seed by seed; its mean is the difference of the means, its sd that of the
paired differences). "Gain kept" is the share of the baseline's fall in validation loss (from the pretrained
model's, step 0) that the runs also made, mean over mean: 100% is as good as the baseline, 0% learned nothing."""

import math
import statistics
from pathlib import Path

from scripts.study_grid import ABLATIONS, BASELINE, EQUAL_FLOPS, EQUAL_STEPS

# val loss: on the answers of the validation questions; held-out NLL: lm-eval's log answer perplexity, the mean
# negative log-likelihood of a held-out question's whole answer (nats); exact match: generated answers, held out
METRICS = {"val loss": lambda r: r["final_val_loss"],
           "held-out NLL": lambda r: math.log(r["heldout"]["answer_perplexity"]),
           "exact match": lambda r: r["heldout"]["exact_match"]}


def mean_sd(values: list) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list, digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def config_key(r: dict) -> tuple:
    return r["size"], r["method"], r["variant"], r["protocol"], r["ablation"]


def by_config(results: list) -> dict:
    """config key -> its runs, ordered by seed."""
    groups = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        groups.setdefault(config_key(r), []).append(r)
    return groups


def baseline_key(key: tuple) -> tuple:
    size, method, _, _, ablation = key
    own = ablation and ABLATIONS[ablation]["own_baseline"]
    return size, method, "baseline", BASELINE, ablation if own else ""


def gaps(groups: dict, key: tuple, metric: str) -> list:
    """Per seed: the run's metric minus the baseline's of the same seed."""
    base = {r["seed"]: METRICS[metric](r) for r in groups[baseline_key(key)]}
    return [METRICS[metric](r) - base[r["seed"]] for r in groups[key]]


def start_loss(r: dict) -> float:
    """The validation loss before fine-tuning (the run's step-0 validation)."""
    assert r["curve"][0]["step"] == 0, "runs validate before training (EvalArgs.initial_validation)"
    return r["curve"][0]["val_loss"]


def gain_kept(groups: dict, key: tuple) -> float:
    """The runs' mean fall in validation loss over their baselines' (same seeds); NaN when the baselines' loss did not
    fall on average (a share of nothing means nothing). A ratio of means: seed by seed, a baseline that barely moved
    would make the share of that seed meaningless."""
    base = {r["seed"]: r["final_val_loss"] for r in groups[baseline_key(key)]}
    runs = groups[key]
    baseline_fall = statistics.fmean(start_loss(r) - base[r["seed"]] for r in runs)
    run_fall = statistics.fmean(start_loss(r) - r["final_val_loss"] for r in runs)
    return run_fall / baseline_fall if baseline_fall > 0 else math.nan


def row_stats(groups: dict, key: tuple) -> dict:
    runs = groups[key]
    stats = {m: mean_sd([f(r) for r in runs]) for m, f in METRICS.items()}
    stats.update({f"gap {m}": mean_sd(gaps(groups, key, m)) for m in METRICS})
    stats["gain kept"] = gain_kept(groups, key)
    stats.update(seeds=len(runs), steps=runs[0]["steps"], flops=statistics.fmean(r["flops"] for r in runs),
                 time=statistics.fmean(r["train_time_s"] for r in runs))
    return stats


def pm(stat: tuple, digits: int = 3, sign: str = "") -> str:
    return f"{stat[0]:{sign}.{digits}f} ± {stat[1]:.{digits}f}"


def percent(share: float) -> str:
    return "– (baseline's loss rose)" if math.isnan(share) else f"{share:.0%}"


METRIC_HEAD = "val loss | gap val loss | gain kept | held-out NLL | gap held-out NLL | exact match | gap exact match"


def metric_cells(s: dict) -> str:
    """The cells of METRIC_HEAD."""
    return (f"{pm(s['val loss'])} | {pm(s['gap val loss'], sign='+')} | {percent(s['gain kept'])} |"
            f" {pm(s['held-out NLL'], 2)} | {pm(s['gap held-out NLL'], 2, '+')} | {pm(s['exact match'])} |"
            f" {pm(s['gap exact match'], sign='+')}")


def grid_table(groups: dict, size: str, method: str) -> list:
    lines = [f"| Run | protocol | seeds | steps | FLOPs | {METRIC_HEAD} | train time (s) |", "|---" * 13 + "|"]
    keys = sorted((k for k in groups if k[:2] == (size, method) and not k[4]),
                  key=lambda k: (k[2] != "baseline", k[2], k[3]))
    for key in keys:
        s = row_stats(groups, key)
        lines.append(f"| {key[2]} | {key[3]} | {s['seeds']} | {s['steps']} | {s['flops']:.0f} | {metric_cells(s)} |"
                     f" {s['time']:.1f} |")
    return lines


SCALE_COLUMNS = {"gap val loss": lambda s: pm(s["gap val loss"], sign="+"),
                 "gain kept": lambda s: percent(s["gain kept"]),
                 "gap held-out NLL": lambda s: pm(s["gap held-out NLL"], 2, "+"),
                 "gap exact match": lambda s: pm(s["gap exact match"], sign="+")}


def scale_table(groups: dict, sizes: list, params: dict) -> list:
    """The DropBP-minus-baseline gap at each size, one row per method, rate and protocol."""
    head = " | ".join(f"{s} ({params[s] / 1e6:.2f}M)" for s in sizes)
    lines = ["| method | run | protocol | " + " | ".join(f"{c}: {head}" for c in SCALE_COLUMNS) + " |",
             "|---|---|---|" + "---|" * (len(SCALE_COLUMNS) * len(sizes))]
    for method, variant, protocol in sorted({k[1:4] for k in groups if k[2] != "baseline" and not k[4]}):
        stats = [row_stats(groups, (s, method, variant, protocol, "")) if (s, method, variant, protocol, "") in groups
                 else None for s in sizes]
        cells = [column(s) if s else "–" for column in SCALE_COLUMNS.values() for s in stats]
        lines.append(f"| {method} | {variant} | {protocol} | {' | '.join(cells)} |")
    return lines


def ablation_table(groups: dict, size: str) -> list:
    lines = [f"| ablation (LoRA, equal steps) | run | seeds | {METRIC_HEAD} |", "|---" * 10 + "|"]
    ablated = sorted({k[4] for k in groups if k[0] == size and k[4]})
    rates = {k[2] for k in groups if k[0] == size and k[4] and k[2] != "baseline"}
    rows = [("none", (size, "lora", v, EQUAL_STEPS, "")) for v in sorted(rates)]
    rows += [(a, k) for a in ablated for k in groups if k[0] == size and k[4] == a]
    for name, key in rows:
        if key not in groups:
            continue
        s = row_stats(groups, key)
        lines.append(f"| {name} | {key[2]} | {s['seeds']} | {metric_cells(s)} |")
    return lines


def curve_band(runs: list, axis: str) -> tuple:
    """x (mean over seeds), mean, min and max of the validation loss at each validation point the runs share."""
    n = min(len(r["curve"]) for r in runs)
    xs = [statistics.fmean(r["curve"][i][axis] for r in runs) for i in range(n)]
    ys = [[r["curve"][i]["val_loss"] for r in runs] for i in range(n)]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_curves(groups: dict, size: str, method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    variants = sorted({k[2] for k in groups}, key=lambda v: (v != "baseline", v))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}  # a variant keeps its colour in both panels
    for ax, protocol, axis in ((axes[0], EQUAL_STEPS, "step"), (axes[1], EQUAL_FLOPS, "flops")):
        for key, runs in sorted(groups.items(), key=lambda item: variants.index(item[0][2])):
            if key[:2] != (size, method) or key[4] or key[3] not in (BASELINE, protocol):
                continue
            xs, mean, lo, hi = curve_band(runs, axis)
            ax.plot(xs, mean, label=f"{key[2]} ({len(runs)} seeds)", color=colors[key[2]])
            ax.fill_between(xs, lo, hi, alpha=0.2, color=colors[key[2]])
        ax.set_xlabel("optimizer step" if axis == "step" else "FLOPs (forward units of the blocks per micro-batch)")
        ax.set_title(protocol)
        ax.set_ylabel("validation loss")
        ax.legend()
    fig.suptitle(f"{size} {method}: validation loss, mean over seeds, band min to max")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scale(groups: dict, sizes: list, params: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for method, variant, protocol in sorted({k[1:4] for k in groups if k[2] != "baseline" and not k[4]}):
        present = [s for s in sizes if (s, method, variant, protocol, "") in groups]
        for ax, column in zip(axes.flat, SCALE_COLUMNS):
            stats = [row_stats(groups, (s, method, variant, protocol, ""))[column] for s in present]
            stats = [(x, 0.0) if isinstance(x, float) else x for x in stats]  # gain kept: one ratio, no spread
            ax.errorbar([params[s] for s in present], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                        marker="o", capsize=3, label=f"{method} {variant} {protocol}")
    for ax, column in zip(axes.flat, SCALE_COLUMNS):
        ax.axhline(1.0 if column == "gain kept" else 0.0, color="gray", lw=0.8)
        if column == "gain kept":  # a baseline that barely moved makes shares of thousands of percent: cut them
            ax.set_ylim(-1.0, 1.6)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(column + (" (axis cut at -100%)" if column == "gain kept" else ""))
        ax.set_ylabel("DropBP against its seed's baseline")
    axes.flat[1].legend(fontsize=7)
    fig.suptitle("The gap against model size (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: list, models: dict, out_dir: Path, ablation_size: str, header: list) -> str:
    """report.md and the PNGs in out_dir; returns the markdown. ``models``: size -> its pretraining summary."""
    groups = by_config(results)
    sizes = [s for s in models if any(k[0] == s for k in groups)]
    params = {s: models[s]["params"] for s in models}
    lines = header + ["", "## Pretrained models", "",
                      "| size | layers x width | parameters | pretraining steps | final loss | plateau (loss fall, last"
                      " tenth) | val loss before fine-tuning | held-out NLL before | held-out exact match before |",
                      "|---" * 9 + "|"]
    for s in sizes:
        m = models[s]
        plateau = "–" if m["pretrain"].get("plateau") is None else f"{m['pretrain']['plateau']:.1%}"
        start = next(start_loss(r) for runs in groups.values() for r in runs if r["size"] == s)
        lines.append(f"| {s} | {m['shape']} | {m['params'] / 1e6:.2f}M | {m['pretrain']['steps']} |"
                     f" {m['pretrain']['final_loss']:.3f} | {plateau} | {start:.3f} |"
                     f" {math.log(m['base']['answer_perplexity']):.2f} | {m['base']['exact_match']:.3f} |")
    for s in sizes:
        for method in sorted({k[1] for k in groups if k[0] == s}):
            path = out_dir / f"curves_{s}_{method}.png"
            plot_curves(groups, s, method, path)
            lines += ["", f"## {s}, {method} (curves: {path.name})", ""] + grid_table(groups, s, method)
    plot_scale(groups, sizes, params, out_dir / "scale_trend.png")
    lines += ["", "## Scale trend: DropBP minus baseline, per seed, mean ± sd (plot: scale_trend.png)", ""]
    lines += scale_table(groups, sizes, params)
    if any(k[4] for k in groups):
        lines += ["", f"## Ablations on the LoRA gap, size {ablation_size}", ""] + ablation_table(groups, ablation_size)
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text
