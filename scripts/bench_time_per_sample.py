"""Time per sample (the paper's Table 5): every variant of one model (DropBP rates, PLD, every branch dropped, and
the models timed beside ours: plain litgpt, the input-gradient floor, full fine-tuning) runs once per round, in an
order shuffled afresh every round; the first ``1 + warmup`` rounds measure memory, the others are timed, and the
rows report medians over rounds and paired ratios against p = 0 (see ``scripts/benchmark.py``).
"""

import random
import statistics
from dataclasses import dataclass, replace
from typing import Optional

import torch

from dropbp import DropBPHandler, PLDHandler
from scripts.bench_model import ModelSpec, build, quantize
from scripts.bench_step import GIB, Step, allocated, aten_ops

THEORY = {"full": 2 / 3, "lora": 1 / 2, "qlora": 1 / 2, "adapter": 1 / 2}
PLD_STEADY_STATE = 10**9  # PLD evaluated at the end of its schedule (keep ratio theta_bar): the paper's "0 -> 0.5"
ORDER_SEED = 0  # seeds the shuffled order of the variants in each round


@dataclass(frozen=True)
class TimingPlan:
    """How the variants run: the DropBP ``rates`` (0.0 included), the micro-batch (``micro_batch_size`` x
    ``seq_len``), ``steps`` timed rounds after ``1 + warmup`` untimed ones, the handler's ``sampling``, whether
    AdamW steps, and what is timed beside ours: plain litgpt (``compare_plain``), the input-gradient floor
    (``input_grad_floor``), full fine-tuning at p = 0 (``beside_full``, PEFT methods)."""

    rates: tuple
    seq_len: int
    micro_batch_size: int
    steps: int = 5
    warmup: int = 2
    sampling: str = "fixed"
    compare_plain: bool = True
    optimizer_step: bool = False
    order_seed: int = ORDER_SEED
    input_grad_floor: bool = False
    beside_full: bool = False


def set_variant(variant, handler: DropBPHandler, pld: PLDHandler) -> None:
    """Put the gates in the state of one variant: a DropBP rate, "pld", or "all" (every branch dropped)."""
    pld.disable()
    if variant == "pld":
        handler.keep_all()
        pld.sample(PLD_STEADY_STATE)
    elif variant == "all":
        handler.set_mask(torch.ones(len(handler.gates), dtype=torch.bool))
    else:
        handler.set_rates(variant)
        handler.sample()


def pld_steady_drop(pld: PLDHandler) -> float:
    """Expected fraction of the blocks PLD skips at the end of its schedule: (1 - theta_bar)(L + 1)/(2L)."""
    keep = pld.keep_probabilities(PLD_STEADY_STATE)
    return 1.0 - sum(keep) / len(keep)


def round_orders(variants: list, rounds: int, seed: int = ORDER_SEED) -> list:
    """The order of the variants in each round: shuffled afresh every round by a seeded ``random.Random``, so
    drift in machine load and order effects (caches, clocks) hit every variant alike and none is always first
    or last."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        orders.append(order)
    return orders


def models_beside(model: torch.nn.Module, spec: ModelSpec, plan: TimingPlan) -> tuple:
    """The Steps of the models timed in our rounds (variant -> Step) and the bytes each allocated, which are left out
    of the other models' peaks: plain litgpt with our weights, the input-gradient floor, full fine-tuning."""
    others, own_bytes = {}, {}

    def beside(variant: str, other: torch.nn.Module, start_bytes: int) -> None:
        others[variant] = Step(other, spec.device, plan.optimizer_step)
        own_bytes[variant] = allocated(spec.device) - start_bytes

    if plan.compare_plain:
        a1 = allocated(spec.device)
        plain = build(spec, plan.seq_len, plain=True)
        plain.load_state_dict(model.state_dict())
        beside("plain", quantize(spec, plain), a1)
    full = replace(spec, method="full", framework="litgpt")
    if plan.input_grad_floor:  # the same shape, every weight frozen: backward computes input gradients only
        a1 = allocated(spec.device)
        frozen = build(full, plan.seq_len)
        for name, p in frozen.named_parameters():
            p.requires_grad_(name == "transformer.wte.weight")  # something upstream must need a gradient
        beside("frozen", frozen, a1)
    if plan.beside_full and spec.method != "full":  # PEFT against full fine-tuning in the same rounds: paired ratios
        a1 = allocated(spec.device)
        beside("full", build(full, plan.seq_len), a1)
    return others, own_bytes


def run_rounds(variants: list, step_of, batch: tuple, plan: TimingPlan) -> tuple:
    """Every variant once per round in the round's shuffled order: the untimed rounds' outputs (with the saved
    activation bytes) go to ``memory``, the timed ones' to ``timed`` (and, on GPU, their peaks to ``memory`` too)."""
    timed = {v: [] for v in variants}
    memory = {v: [] for v in variants}
    for i, order in enumerate(round_orders(variants, 1 + plan.warmup + plan.steps, plan.order_seed)):
        untimed = i <= plan.warmup
        for v in order:
            out = step_of(v)(*batch, measure_saved=untimed)
            (memory if untimed else timed)[v].append(out)
            if not untimed and out["peak"] is not None:  # GPU: every step's allocator peak counts
                memory[v].append({"saved": None, "peak": out["peak"]})
    return timed, memory


def time_per_sample(spec: ModelSpec, plan: TimingPlan) -> list:
    """The Table 5 rows of one model: one per variant, in the order rates, PLD (litgpt models), all dropped, then
    the models timed beside ours."""
    device = spec.device
    a0 = allocated(device)
    model = build(spec, plan.seq_len)
    variants = [*plan.rates, "all"] if spec.framework == "hf" else [*plan.rates, "pld", "all"]  # PLD: litgpt only
    others, own_bytes = models_beside(model, spec, plan)
    variants += list(others)
    model = quantize(spec, model)
    handler = DropBPHandler(model, sampling=plan.sampling, seed=0)
    pld = PLDHandler(model, theta_bar=0.5, gamma=0.001, seed=0)
    step = Step(model, device, plan.optimizer_step)
    total_bytes = allocated(device) - a0
    step.other_bytes = sum(own_bytes.values())  # the other models' weights (and moments): left out of each peak
    for v, other in others.items():
        other.other_bytes = total_bytes - own_bytes[v]
    vocab = spec.dims["vocab_size"] if spec.framework == "hf" else model.config.padded_vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (plan.micro_batch_size, plan.seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (plan.micro_batch_size, plan.seq_len), generator=g).to(device)

    def step_of(v) -> Step:
        """The Step that runs variant ``v``, its gates set (drawing a mask dispatches ATen ops of its own)."""
        if v in others:
            return others[v]
        set_variant(v, handler, pld)
        return step

    timed, memory = run_rounds(variants, step_of, (x, y), plan)
    ops = {}  # one more step per variant, profiled (not timed)
    for v in variants:
        run = step_of(v)
        ops[v] = aten_ops(lambda: run(x, y, measure_saved=False))
    pld.disable()
    rows = summarise(spec.method, timed, memory, plan.micro_batch_size, pld_steady_drop(pld), plan.order_seed)
    for row in rows:
        row.update(framework=spec.framework, compiled=spec.compile, aten_ops=ops[row["variant"]])
    return rows


def summarise(method: str, timed: dict, memory: dict, micro_batch_size: int, pld_drop: float,
              order_seed: int = ORDER_SEED) -> list:
    def ms(v, key):  # median ms per sample
        return 1000 * statistics.median(r[key] for r in timed[v]) / micro_batch_size

    def spread(v, key):
        values = [1000 * r[key] / micro_batch_size for r in timed[v]]
        return max(values) - min(values)

    def saved(v):
        return statistics.median(r["saved"] for r in memory[v] if r["saved"] is not None)

    bw0, bw1 = ms(0.0, "bw"), ms("all", "bw")
    total0 = ms(0.0, "fw") + bw0
    saved0 = saved(0.0)
    rows = []
    for v in timed:
        fw, bw = ms(v, "fw"), ms(v, "bw")
        rate = {"pld": pld_drop, "all": 1.0, "plain": 0.0, "frozen": 0.0, "full": 0.0}.get(v, v)
        reduction = 1 - (fw + bw) / total0
        # PLD skips forward and backward of a dropped block: its theory is the fraction of the blocks it skips
        theory = pld_drop if v == "pld" else THEORY[method] * rate
        row = {
            "method": method, "variant": v, "rate": rate, "fw_ms": fw, "bw_ms": bw, "total_ms": fw + bw,
            "fw_spread_ms": spread(v, "fw"), "bw_spread_ms": spread(v, "bw"),
            "reduction": reduction, "theory": theory, "achieved_over_theory": reduction / theory if theory else None,
            "bw_efficiency": (bw0 - bw) / (rate * (bw0 - bw1)) if isinstance(v, float) and 0 < v < 1 else None,
            "saved_bytes_ratio": saved(v) / saved0 if saved0 else None,
            "peak_gib": max(r["peak"] for r in memory[v]) / GIB,
            "timed_rounds": len(timed[v]), "order_seed": order_seed,
        }
        if v == "plain":
            row.update(overhead(timed[0.0], timed["plain"]))
        if v == "full":
            row.update(against_full(timed[0.0], timed["full"], timed.get("frozen")))
        rows.append(row)
    return rows


def paired(ours: list, other: list, key: str) -> list:
    """Per round, ``ours / other`` of the forward, backward or "total" time: both ran in the same round, in
    shuffled order, so load drift between rounds cancels."""
    def value(r):
        return r["fw"] + r["bw"] if key == "total" else r[key]

    return [value(o) / value(p) for o, p in zip(ours, other)]


def median_and_quartiles(values: list) -> tuple:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), quartiles[0], quartiles[2]


def overhead(ours: list, plain: list) -> dict:
    """Gated model at p = 0 against plain litgpt, paired by round: the median and quartiles over rounds of
    ours / plain - 1, for the total and for forward and backward."""
    total, q1, q3 = median_and_quartiles([r - 1 for r in paired(ours, plain, "total")])
    return {"overhead": total, "overhead_q1": q1, "overhead_q3": q3,
            "overhead_fw": statistics.median(paired(ours, plain, "fw")) - 1,
            "overhead_bw": statistics.median(paired(ours, plain, "bw")) - 1}


def against_full(ours: list, full: list, frozen: Optional[list]) -> dict:
    """A PEFT method at p = 0 against full fine-tuning at p = 0 (both gated), paired by round: medians and
    quartiles of ours / full for forward, backward and total; with the input-gradient floor timed in the same
    rounds, its backward over full's too."""
    row = {}
    for key in ("fw", "bw", "total"):
        row[f"{key}_vs_full"], row[f"{key}_vs_full_q1"], row[f"{key}_vs_full_q3"] = median_and_quartiles(
            paired(ours, full, key))
    row["floor_bw_vs_full"] = statistics.median(paired(frozen, full, "bw")) if frozen else None
    return row
