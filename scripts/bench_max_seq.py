"""The longest trainable sequence length per drop rate (the paper's Tables 2 and 3): doubling from a start length,
then a bisection guided by the measured peaks of the lengths that fitted, every probe in a probe process
(``scripts/bench_probe.py``)."""

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from scripts.bench_model import ModelSpec
from scripts.bench_probe import ProbeRunner
from scripts.bench_step import GIB, size


@dataclass(frozen=True)
class MaxSeqPlan:
    """The search: the drop ``rates`` (one search each), the micro-batch size and ``sampling`` of the probes, the
    memory limits (``budget_gib`` of measured peak; ``gpu_memory_gib``: the CUDA allocator capped, e.g. an 80 GiB
    card on a larger one), the lengths (doubling from ``start``, at most ``limit``, bisected to ``granularity``),
    ``probe_steps`` training steps per probe, and whether every probe gets a fresh process."""

    rates: tuple
    micro_batch_size: int = 1
    sampling: str = "fixed"
    budget_gib: Optional[float] = None
    start: int = 256
    limit: int = 16384
    probe_steps: int = 3
    granularity: int = 256
    gpu_memory_gib: Optional[float] = None
    fresh_process_per_probe: bool = False


def predict_max_fit(trace: list) -> Optional[float]:
    """The length at which the peak reaches the memory cap (the budget, or the GPU allocator's cap, as the probe
    process reports it), on the line through the two longest lengths that fitted."""
    cap_bytes = next((r["cap_bytes"] for r in reversed(trace) if r.get("cap_bytes")), None)
    points = sorted({(r["seq_len"], r["peak_bytes"]) for r in trace if r["fits"] and r.get("peak_bytes")})
    if cap_bytes is None or len(points) < 2:
        return None
    (n1, p1), (n2, p2) = points[-2], points[-1]
    if n2 == n1 or p2 <= p1:
        return None
    return n2 + (cap_bytes - p2) * (n2 - n1) / (p2 - p1)


def search_max_seq(probe: Callable[[int], dict], start: int, limit: int, granularity: int,
                   log: Callable = print) -> dict:
    """The longest length in multiples of ``granularity`` (or ``start``/``limit``) for which ``probe`` fits.

    Doubles from ``start`` until a probe does not fit (a length past ``limit`` is probed at ``limit``), then
    bisects the bracket. While the peaks of the lengths that fitted predict where the memory cap is reached, the
    next probe is that prediction (clamped into the bracket), which with the next one usually closes the bracket
    in two probes; otherwise the midpoint. Assumes memory grows with the length (a longer length never fits when
    a shorter one did not). A probe that ran out of memory means that length does not fit, nothing more."""
    trace = []

    def run(n: int) -> bool:
        result = probe(n)
        trace.append({"seq_len": n, **result})
        peak = "" if not result.get("peak_bytes") else f", peak {size(result['peak_bytes'])}"
        why = "fits" if result["fits"] else ("out of memory" if result.get("oom") else "over the budget")
        log(f"  seq {n}: {why}{peak}, {result.get('seconds', 0.0):.1f} s"
            + (f" (process {result['process']})" if "process" in result else ""))
        return result["fits"]

    good, bad, n = 0, None, start
    while True:
        n = min(n, limit)
        if not run(n):
            bad = n
            break
        good = n
        if n >= limit:
            break
        n *= 2
    guided = 2  # prediction-led probes before plain bisection
    while bad is not None:
        low, high = (good // granularity + 1) * granularity, (bad - 1) // granularity * granularity
        if low > high:
            break
        prediction = predict_max_fit(trace) if guided else None
        if prediction is not None:
            guided -= 1
            candidate = int(prediction) // granularity * granularity
        else:
            candidate = (good + bad) // 2 // granularity * granularity
        candidate = min(max(candidate, low), high)
        if run(candidate):
            good = candidate
        else:
            bad = candidate
    return {"max_seq_len": good, "first_failure": bad, "limit_reached": good >= limit, "probes": trace}


def probe_spec(spec: ModelSpec, plan: MaxSeqPlan) -> dict:
    """What a probe process builds and how it probes, as JSON (the model's block size is the search's limit)."""
    return dict(method=spec.method, model_name=spec.model_name, dims=spec.dims, block_size=plan.limit,
                device=spec.device, precision=spec.precision, sampling=plan.sampling,
                micro_batch_size=plan.micro_batch_size, probe_steps=plan.probe_steps,
                budget_bytes=None if plan.budget_gib is None else plan.budget_gib * GIB,
                gpu_memory_gib=plan.gpu_memory_gib, threads=torch.get_num_threads())


def search_rate(runner: ProbeRunner, rate: float, first: int, plan: MaxSeqPlan) -> dict:
    """One rate's search from ``first``, logged; a probe process that failed otherwise than by running out of memory
    gives a row with its error and no length."""
    t0 = time.perf_counter()
    try:
        found = search_max_seq(lambda n: runner(rate, n), first, plan.limit, plan.granularity,
                               log=lambda line: print(line, flush=True))
    except RuntimeError as e:
        print(f"  -> failed: {e}", flush=True)
        return {"max_seq_len": None, "first_failure": None, "limit_reached": False, "probes": [], "error": str(e)}
    print(f"  -> {found['max_seq_len']}{' (limit)' if found['limit_reached'] else ''}, "
          f"{len(found['probes'])} probes, {time.perf_counter() - t0:.0f} s", flush=True)
    return found


def find_max_seq(spec: ModelSpec, plan: MaxSeqPlan, on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Per rate, the longest trainable sequence (:func:`search_max_seq`), every probe in a probe process. A rate
    at least as high as the previous one starts doubling from the previous result (probed again, not assumed).
    A probe process that fails otherwise than by running out of memory ends that rate's search with an error in
    its row (never a length), and the next rate starts in a new process.
    ``on_row`` gets each rate's row as soon as it is found (the CLI writes ``--out`` then, so that a run stopped
    by a time limit keeps the rates it finished)."""
    runner = ProbeRunner(probe_spec(spec, plan), plan.fresh_process_per_probe)
    rows, previous = [], None
    try:
        for rate in plan.rates:
            first = plan.start
            if previous is not None and rate >= previous[0] and previous[1] >= plan.start:
                first = previous[1]
            print(f"max seq len: {spec.method}, p={rate}, {plan.sampling} sampling, doubling from {first}", flush=True)
            found = search_rate(runner, rate, first, plan)
            if found["max_seq_len"] is not None:
                previous = (rate, found["max_seq_len"])
            rows.append({"method": spec.method, "rate": rate, "sampling": plan.sampling, **found,
                         "granularity": plan.granularity, "memory_budget_gib": plan.budget_gib,
                         "gpu_memory_gib": plan.gpu_memory_gib, "device_name": runner.device_name})
            if on_row is not None:
                on_row(rows[-1])
    finally:
        runner.close()
    return rows
