"""Time per sample and memory with DropBP, in the layout of the paper's Tables 2, 3 and 5.

Time per sample (Table 5). Every round runs each variant once (p=0, p=0.5, ..., PLD, all-dropped, plain litgpt) in
an order shuffled by a seeded ``random.Random``, so no variant is always first or last, and medians over the timed
rounds are reported. Besides the total reduction against appendix B's theory (full: 2/3 p, PEFT: 1/2 p) it reports
the backward-saving efficiency (BW(0) - BW(p)) / (p * (BW(0) - BW(1))), where BW(1) is the never-droppable part
(embedding, final norm, head, loss), measured with every branch dropped, and the overhead of our gated model at
p = 0 against plain, unpatched litgpt on the same inputs: the median over rounds of the paired ratio. With
``--beside_full true`` full fine-tuning at p = 0 runs in every PEFT method's rounds too, for the PEFT method's time
over full fine-tuning's, paired the same way.
The first ``1 + warmup`` rounds are untimed; they measure memory (a saved-tensors hook counts the activations kept
for backward, a Python call per saved tensor that the timed rounds do not carry).

Max sequence length (Tables 2, 3). Probes (a few training steps at one length, AdamW moments created before the
first) run in a probe process, never in this one, and a probe process is replaced after any out-of-memory (with
``--fresh_process_per_probe``, after every probe): a process that once ran out of GPU memory cannot be trusted
afterwards (on an H200 every later probe in such a process failed). The search doubles from ``--max_seq_start``,
then bisects to ``--granularity`` tokens, guided by the measured peaks of the lengths that fit.

    python scripts/benchmark.py --n_layer 8 --n_embd 256 --seq_len 256 --micro_batch_size 4
    python scripts/benchmark.py --model_name Llama-2-7b-hf --precision bf16-true --device cuda --seq_len 512 \
        --micro_batch_size 2
    python scripts/benchmark.py --methods '[lora]' --rates '[0.0]' --beside_full true --input_grad_floor true
    python scripts/benchmark.py --profile true --n_embd 64 --seq_len 16 --micro_batch_size 1   # the gates' cost
    python scripts/benchmark.py --find_max_seq_len true --methods '[full]' --rates '[0.0, 0.875]' --memory_budget 2.0
    python scripts/benchmark.py --find_max_seq_len true --model_name Llama-2-7b-hf --precision bf16-true \
        --device cuda --gpu_memory_gib 80 --methods '[full]' --micro_batch_size 1     # an 80 GiB A100 on a larger card

Memory: on GPU the peak of ``torch.cuda.max_memory_allocated`` over a training step (optimizer step included when
``--optimizer_step``), less the bytes of the other model when plain litgpt is compared in the same process (measured
with ``torch.cuda.memory_allocated`` when each model and its optimizer were built). On CPU torch keeps no allocator
statistics, so "peak" is the model state (parameters, gradients, and AdamW moments when ``--optimizer_step``) plus
the activations saved for backward at the end of the forward pass, which is where a training step peaks.
"""

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import litgpt.adapter_v2
import litgpt.lora
import litgpt.model
import torch
from jsonargparse import CLI

import lit_gpt.adapter_v2
import lit_gpt.lora
import lit_gpt.model
from dropbp import DropBPHandler, PLDHandler
from lit_gpt.gated import compile_branches, compile_unsupported, reset_adapter_cache

THEORY = {"full": 2 / 3, "lora": 1 / 2, "qlora": 1 / 2, "adapter": 1 / 2}
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
GIB = 2**30
PLD_STEADY_STATE = 10**9  # PLD evaluated at the end of its schedule (keep ratio theta_bar): the paper's "0 -> 0.5"
ORDER_SEED = 0  # seeds the shuffled order of the variants in each round
PROBE_WORKER_FLAG = "--probe_worker"  # hidden mode: this script as a probe process (see ProbeWorker)
RESULT_PREFIX = "PROBE_RESULT "


# --------------------------------------------------------------------------------------------- models
def make_config(config_class, model_name: Optional[str], dims: dict, block_size: int, **extra):
    if model_name is not None:
        return config_class.from_name(model_name, block_size=block_size, **{k: v for k, v in dims.items() if v}, **extra)
    n_embd = dims["n_embd"]
    return config_class.from_name(
        "Llama-2-7b-hf", n_layer=dims["n_layer"], n_embd=n_embd, n_head=dims["n_head"], n_query_groups=dims["n_head"],
        block_size=block_size, vocab_size=dims["vocab_size"], padded_vocab_size=dims["vocab_size"],
        intermediate_size=max(64, int(n_embd * 8 / 3) // 64 * 64), **extra,
    )


LORA = dict(lora_r=8, lora_alpha=16, lora_query=True, lora_key=True, lora_value=True, lora_projection=True,
            lora_mlp=True)


def build(method: str, model_name, dims, block_size, device, dtype, plain: bool = False, framework: str = "litgpt",
          compile: bool = False):
    """Our gated model (or plain litgpt's, for the overhead comparison), trainable parameters marked as in the recipe.
    ``framework="hf"``: a Hugging Face Transformers LLaMA of the same shape (PEFT LoRA for ``lora``), gated by
    ``dropbp.integrations.transformers`` (or unpatched, ``plain``)."""
    if framework == "hf":
        from dropbp.integrations.transformers import build_gated_llama

        if model_name is not None or method not in ("full", "lora"):
            raise SystemExit("error: --framework hf builds a LLaMA of --n_layer x --n_embd, for --methods full/lora")
        return build_gated_llama(dims["n_layer"], dims["n_embd"], dims["n_head"], dims["vocab_size"], block_size,
                                 method=method, device=device, dtype=dtype, gated=not plain)[0]
    if method == "full":
        cls = litgpt.model.GPT if plain else lit_gpt.model.GPT
        config = make_config(litgpt.model.Config, model_name, dims, block_size)
    elif method in ("lora", "qlora"):
        cls = litgpt.lora.GPT if plain else lit_gpt.lora.GPT
        config = make_config(litgpt.lora.Config, model_name, dims, block_size, **LORA)
    elif method == "adapter":
        cls = litgpt.adapter_v2.GPT if plain else lit_gpt.adapter_v2.GPT
        config = make_config(litgpt.adapter_v2.Config, model_name, dims, block_size)
    else:
        raise SystemExit(f"error: unknown method {method!r}; choose full, lora, qlora or adapter")
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target precision: a 7B model never exists in fp32 on the GPU
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if method in ("lora", "qlora"):
        litgpt.lora.mark_only_lora_as_trainable(model)
    elif method == "adapter":
        litgpt.adapter_v2.mark_only_adapter_v2_as_trainable(model)
    if compile:  # ours: the branch functions (as --compile true in the recipes); plain litgpt: each whole block
        if plain:
            for block in model.transformer.h:
                block.compile(dynamic=True)
        else:
            compile_branches(model)
    return model


def quantize(method: str, model, dtype, device: str):
    """QLoRA: the frozen base in bitsandbytes NF4 (after any weight copying: 4-bit state dicts differ)."""
    if method != "qlora":
        return model
    from lit_gpt.quantize import quantize_frozen_linears

    return quantize_frozen_linears(model, "nf4", dtype, device=device)


def size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


# ------------------------------------------------------------------------------------------ measuring
class Step:
    """One training step (forward, backward, optionally AdamW) of a micro-batch, timed and memory-measured.

    With ``optimizer_step`` the AdamW moments of every trainable parameter exist from the start (one step at
    learning rate 0 on zero gradients, which leaves the weights bitwise unchanged), so the first measured step
    already holds the optimizer's memory, as every step of a real run after the first does."""

    def __init__(self, model, device: str, optimizer_step: bool) -> None:
        self.model, self.device = model, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-9, foreach=False) if optimizer_step else None
        self.param_ptrs = {p.data_ptr() for p in model.parameters()}
        self.other_bytes = 0  # bytes of another model in the same process, left out of the peak
        if self.optimizer is not None:
            self.init_optimizer_state()

    def init_optimizer_state(self) -> None:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for p in self.trainable:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.model.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, x, y, measure_saved: bool = True) -> dict:
        """``measure_saved``: count the activation bytes kept for backward (a Python hook per saved tensor, so the
        timed rounds of the Table 5 benchmark run without it)."""
        saved = 0

        def pack(t):  # activation bytes only: weights saved for backward are not activation memory
            nonlocal saved
            if t.data_ptr() not in self.param_ptrs:
                saved += t.numel() * t.element_size()
            return t

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if hasattr(self.model, "transformer"):  # plain litgpt adapters otherwise fail on their second step
            reset_adapter_cache(self.model)
        self.sync()
        t0 = time.perf_counter()
        if measure_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = self.loss(x, y)
        else:
            loss = self.loss(x, y)
        self.sync()
        t1 = time.perf_counter()
        if loss.requires_grad:  # LoRA with every branch dropped has nothing to back-propagate: skipped, as in training
            loss.backward()
        self.sync()
        t2 = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return {"fw": t1 - t0, "bw": t2 - t1, "saved": saved if measure_saved else None,
                "peak": self.peak_bytes(saved) if measure_saved or self.device == "cuda" else None}

    def loss(self, x, y):
        logits = self.model(x)
        logits = getattr(logits, "logits", logits)  # a Transformers model returns an output object
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def peak_bytes(self, saved: int) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.other_bytes
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = sum(p.numel() * p.element_size() for p in self.trainable)
        moments = 2 * grads if self.optimizer is not None else 0
        return params + grads + moments + saved


def aten_ops(run: Callable[[], object]) -> int:
    """ATen operators that ``run`` dispatches (``torch.profiler``, nested ones included: ``aten::linear`` and the
    ``aten::mm`` it calls count two): a CPU-measurable proxy for the kernel launches and dispatch overhead that
    dominate short GPU kernels. Code that inductor compiled dispatches few ATen operators."""
    return sum(1 for name in profiled_ops(run) if name.startswith("aten::"))


def profiled_ops(run: Callable[[], object]) -> list:
    """The names of the operators ``run`` dispatches, under a CPU ``torch.profiler`` whose start and stop are kept
    quiet: kineto prints two "USDT: ... profiler_start/stop" lines on stderr for each, hundreds per benchmark."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with native_stderr_silenced():
        prof.__enter__()
    try:
        run()
    finally:
        with native_stderr_silenced():
            prof.__exit__(None, None, None)
    return [e.name for e in prof.events()]


@contextmanager
def native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null (what C++ code writes to it, too), restored afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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


def benchmark(method: str, rates: list, model_name, dims: dict, seq_len: int, micro_batch_size: int, steps: int,
              warmup: int, device: str, dtype, sampling: str, compare_plain: bool, optimizer_step: bool,
              order_seed: int = ORDER_SEED, framework: str = "litgpt", compile: bool = False,
              input_grad_floor: bool = False, beside_full: bool = False) -> list:
    a0 = allocated(device)
    model = build(method, model_name, dims, seq_len, device, dtype, framework=framework, compile=compile)
    variants = [*rates, "all"] if framework == "hf" else [*rates, "pld", "all"]  # PLD: litgpt models only
    others, own_bytes = {}, {}  # variant -> the Step of another model timed beside ours, and its bytes

    def beside(variant: str, other: torch.nn.Module, start_bytes: int) -> None:
        """Time ``other`` in our rounds; what it allocated since ``start_bytes`` is left out of the others' peaks."""
        others[variant] = Step(other, device, optimizer_step)
        own_bytes[variant] = allocated(device) - start_bytes

    if compare_plain:
        a1 = allocated(device)
        plain = build(method, model_name, dims, seq_len, device, dtype, plain=True, framework=framework,
                      compile=compile)
        plain.load_state_dict(model.state_dict())
        beside("plain", quantize(method, plain, dtype, device), a1)
    if input_grad_floor:  # the same shape, every weight frozen: backward computes input gradients only
        a1 = allocated(device)
        frozen = build("full", model_name, dims, seq_len, device, dtype, compile=compile)
        for name, p in frozen.named_parameters():
            p.requires_grad_(name == "transformer.wte.weight")  # something upstream must need a gradient
        beside("frozen", frozen, a1)
    if beside_full and method != "full":  # PEFT against full fine-tuning in the same rounds: paired ratios
        a1 = allocated(device)
        beside("full", build("full", model_name, dims, seq_len, device, dtype, compile=compile), a1)
    variants += list(others)
    model = quantize(method, model, dtype, device)
    handler = DropBPHandler(model, sampling=sampling, seed=0)
    pld = PLDHandler(model, theta_bar=0.5, gamma=0.001, seed=0)
    step = Step(model, device, optimizer_step)
    total_bytes = allocated(device) - a0
    step.other_bytes = sum(own_bytes.values())  # the other models' weights (and moments): left out of each peak
    for v, other in others.items():
        other.other_bytes = total_bytes - own_bytes[v]
    vocab = dims["vocab_size"] if framework == "hf" else model.config.padded_vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g).to(device)

    def step_of(v) -> Step:
        """The Step that runs variant ``v``, its gates set (drawing a mask dispatches ATen ops of its own)."""
        if v in others:
            return others[v]
        set_variant(v, handler, pld)
        return step

    timed = {v: [] for v in variants}
    memory = {v: [] for v in variants}
    for i, order in enumerate(round_orders(variants, 1 + warmup + steps, order_seed)):
        untimed = i <= warmup
        for v in order:
            out = step_of(v)(x, y, measure_saved=untimed)
            (memory if untimed else timed)[v].append(out)
            if not untimed and out["peak"] is not None:  # GPU: every step's allocator peak counts
                memory[v].append({"saved": None, "peak": out["peak"]})
    ops = {}  # one more step per variant, profiled (not timed)
    for v in variants:
        run = step_of(v)
        ops[v] = aten_ops(lambda: run(x, y, measure_saved=False))
    pld.disable()
    rows = summarise(method, timed, memory, micro_batch_size, pld_steady_drop(pld), order_seed)
    for row in rows:
        row.update(framework=framework, compiled=compile, aten_ops=ops[row["variant"]])
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


def overhead_line(method: str, plain_row: dict, ours_ops: int) -> str:
    r = plain_row
    return (f"{method}: gated model at p=0 vs {baseline_name(r)}: {r['overhead']:+.1%} time (FW {r['overhead_fw']:+.1%},"
            f" BW {r['overhead_bw']:+.1%}); median of {r['timed_rounds']} paired rounds, quartiles"
            f" [{r['overhead_q1']:+.1%}, {r['overhead_q3']:+.1%}], variant order shuffled each round (seed"
            f" {r['order_seed']}); ATen ops per step {ours_ops} vs {r['aten_ops']}")


# ------------------------------------------------------------------------------------ gate profile
def profile_gates(method: str, dims: dict, seq_len: int, micro_batch_size: int, rounds: int = 20,
                  calls: int = 50) -> dict:
    """What the gates cost at p = 0, block by block: block 0 of our gated model against block 0 of plain litgpt
    (same weights, same inputs, autograd recording): the ATen ops each dispatches (``torch.profiler``), the Python
    function calls each makes (``cProfile``) and the wall time of a block forward (``calls`` calls, ``rounds``
    rounds in shuffled order; min and median of the rounds). Python-bound shapes make the difference visible."""
    import cProfile
    import pstats

    gated = build(method, None, dims, seq_len, "cpu", torch.float32)
    plain = build(method, None, dims, seq_len, "cpu", torch.float32, plain=True)
    plain.load_state_dict(gated.state_dict())
    gated, plain = (quantize(method, m, torch.float32, "cpu") for m in (gated, plain))
    DropBPHandler(gated).keep_all()
    captured = {}

    def capture(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)

    handle = gated.transformer.h[0].register_forward_pre_hook(capture, with_kwargs=True)
    idx = torch.randint(0, gated.config.padded_vocab_size, (micro_batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated(idx)
    handle.remove()
    x = captured["args"][0].detach().requires_grad_(True)
    args, kwargs = (x, *captured["args"][1:]), captured["kwargs"]
    blocks = {"gated": gated.transformer.h[0], "plain": plain.transformer.h[0]}
    if not torch.equal(blocks["gated"](*args, **kwargs), blocks["plain"](*args, **kwargs)):
        raise AssertionError("the gated block at p = 0 differs from plain litgpt's")
    out = {"method": method}
    for name, block in blocks.items():
        out[f"aten_{name}"] = [op for op in profiled_ops(lambda: block(*args, **kwargs)) if op.startswith("aten::")]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            block(*args, **kwargs)
        profiler.disable()
        out[f"python_calls_{name}"] = sum(v[1] for v in pstats.Stats(profiler).stats.values()) / calls
    times = {name: [] for name in blocks}
    for order in round_orders(list(blocks), rounds):
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                blocks[name](*args, **kwargs)
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    for name in blocks:
        out[f"us_{name}_min"], out[f"us_{name}_median"] = min(times[name]), statistics.median(times[name])
    out["same_aten_ops"] = out["aten_gated"] == out["aten_plain"]
    out["aten_ops"] = len(out.pop("aten_gated"))
    out.pop("aten_plain")
    return out


def profile_line(r: dict) -> str:
    return (f"{r['method']}: block forward at p=0, gated vs plain litgpt: same ATen ops {r['same_aten_ops']}"
            f" ({r['aten_ops']}), Python calls {r['python_calls_gated']:.0f} vs {r['python_calls_plain']:.0f},"
            f" {r['us_gated_min']:.1f} vs {r['us_plain_min']:.1f} us (min; median {r['us_gated_median']:.1f} vs"
            f" {r['us_plain_median']:.1f}): {r['us_gated_min'] - r['us_plain_min']:+.1f} us per block (2 gates)")


# ------------------------------------------------------------------------------------- max seq length
def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors, and the CUDA libraries' failed allocations (cuBLAS, cuDNN)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "alloc_failed" in message)


class ProbeState:
    """What a probe process builds once: the model, its handler, and a training step with AdamW moments."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        device, dtype = spec["device"], DTYPES[spec["precision"]]
        self.cap_bytes = spec.get("budget_bytes")
        if device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            cap = total
            if spec.get("gpu_memory_gib"):  # a smaller card on a larger one: the allocator refuses beyond the cap
                cap = int(spec["gpu_memory_gib"] * GIB)
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
            self.cap_bytes = min(cap, self.cap_bytes or cap)
        self.model = quantize(spec["method"], build(spec["method"], spec["model_name"], spec["dims"],
                                                    spec["block_size"], device, dtype), dtype, device)
        self.handler = DropBPHandler(self.model, sampling=spec["sampling"], seed=0)
        self.step = Step(self.model, device, optimizer_step=True)

    def probe(self, rate: float, seq_len: int) -> dict:
        """``probe_steps`` training steps at ``seq_len``; fits when none runs out of memory or over the budget.
        The handler is reseeded, so a length sees the same masks whatever the process probed before."""
        spec, device = self.spec, self.spec["device"]
        vocab = self.model.config.padded_vocab_size
        self.handler.generator.manual_seed(0)
        peak, fits = 0, True
        try:
            x = torch.randint(0, vocab, (spec["micro_batch_size"], seq_len), device=device)
            for _ in range(spec["probe_steps"]):  # with Bernoulli sampling the kept count, hence memory, varies
                self.handler.set_rates(rate)
                self.handler.sample()
                peak = max(peak, self.step(x, x)["peak"])
                if spec.get("budget_bytes") is not None and peak > spec["budget_bytes"]:
                    fits = False
                    break
            return {"fits": fits, "oom": False, "peak_bytes": peak}
        finally:
            x = None
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def probe_worker(spec: dict) -> None:
    """The hidden ``--probe_worker`` mode: read probe requests (JSON lines) from stdin, answer each with one line
    ``PROBE_RESULT {json}`` on stdout, and exit after the first probe that runs out of memory: a process is never
    reused after an out-of-memory error."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    state = None
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.perf_counter()
        try:
            if state is None:  # built at the first request, so an out-of-memory while building is an answer too
                state = ProbeState(spec)
            result = state.probe(request["rate"], request["seq_len"])
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which decides)
            if not is_out_of_memory(e):
                raise
            result = {"fits": False, "oom": True, "peak_bytes": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        result.update(seconds=time.perf_counter() - t0, cap_bytes=getattr(state, "cap_bytes", None),
                      device_name=torch.cuda.get_device_name() if spec["device"] == "cuda" else "cpu")
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        if result["oom"]:
            return


class ProbeWorker:
    """The parent's handle on one probe process: ``python scripts/benchmark.py --probe_worker '<spec>'``."""

    def __init__(self, spec: dict, argv: Optional[list] = None) -> None:
        argv = argv or [sys.executable, str(Path(__file__).resolve()), PROBE_WORKER_FLAG, json.dumps(spec)]
        # stderr is inherited: warnings and tracebacks of the probe process appear as they happen
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def probe(self, rate: float, seq_len: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"rate": rate, "seq_len": seq_len}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process is gone: its exit status below says why
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
            print(f"  [probe process] {line.rstrip()}", file=sys.stderr)
        status = self.proc.wait()
        if status in (-9, 137):  # SIGKILL: on CPU the kernel's out-of-memory killer
            return {"fits": False, "oom": True, "peak_bytes": None, "error": "probe process killed (SIGKILL)"}
        raise RuntimeError(f"the probe process for seq {seq_len} exited with status {status} without an answer"
                           " (its error is printed above)")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if not stream.closed:
                stream.close()


class ProbeRunner:
    """Runs probes in probe processes. ``fresh_process_per_probe``: a new process for every probe. Otherwise one
    process answers probes until one of them runs out of memory (or fails), and the next probe gets a new process:
    a probe that fitted left nothing behind (gradients freed, caches emptied; the weights and AdamW moments were
    allocated first and stay where a fresh process would put them), so only an out-of-memory poisons a process."""

    def __init__(self, spec: dict, fresh_process_per_probe: bool = False) -> None:
        self.spec, self.fresh = spec, fresh_process_per_probe
        self.worker = None
        self.processes = 0
        self.device_name = None

    def start_worker(self):
        return ProbeWorker(self.spec)

    def __call__(self, rate: float, seq_len: int) -> dict:
        if self.worker is None:
            self.worker = self.start_worker()
            self.processes += 1
        try:
            result = self.worker.probe(rate, seq_len)
        except BaseException:
            self.close()
            raise
        result["process"] = self.processes
        self.device_name = result.get("device_name", self.device_name)
        if self.fresh or result["oom"]:
            self.close()
        return result

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


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


def find_max_seq(method, rates, model_name, dims, micro_batch_size, device, precision, sampling, budget_gib,
                 start: int, limit: int, probe_steps: int, granularity: int, gpu_memory_gib=None,
                 fresh_process_per_probe: bool = False, on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Per rate, the longest trainable sequence (:func:`search_max_seq`), every probe in a probe process. A rate
    at least as high as the previous one starts doubling from the previous result (probed again, not assumed).
    A probe process that fails otherwise than by running out of memory ends that rate's search with an error in
    its row (never a length), and the next rate starts in a new process.
    ``on_row`` gets each rate's row as soon as it is found (the CLI writes ``--out`` then, so that a run stopped
    by a time limit keeps the rates it finished)."""
    spec = dict(method=method, model_name=model_name, dims=dims, block_size=limit, device=device,
                precision=precision, sampling=sampling, micro_batch_size=micro_batch_size, probe_steps=probe_steps,
                budget_bytes=None if budget_gib is None else budget_gib * GIB, gpu_memory_gib=gpu_memory_gib,
                threads=torch.get_num_threads())
    runner = ProbeRunner(spec, fresh_process_per_probe)
    rows, previous = [], None
    try:
        for rate in rates:
            first = start
            if previous is not None and rate >= previous[0] and previous[1] >= start:
                first = previous[1]
            print(f"max seq len: {method}, p={rate}, {sampling} sampling, doubling from {first}", flush=True)
            t0 = time.perf_counter()
            try:
                found = search_max_seq(lambda n: runner(rate, n), first, limit, granularity,
                                       log=lambda line: print(line, flush=True))
                print(f"  -> {found['max_seq_len']}{' (limit)' if found['limit_reached'] else ''}, "
                      f"{len(found['probes'])} probes, {time.perf_counter() - t0:.0f} s", flush=True)
                previous = (rate, found["max_seq_len"])
            except RuntimeError as e:  # a probe process failed otherwise than by running out of memory
                print(f"  -> failed: {e}", flush=True)
                found = {"max_seq_len": None, "first_failure": None, "limit_reached": False, "probes": [],
                         "error": str(e)}
            rows.append({"method": method, "rate": rate, "sampling": sampling, **found, "granularity": granularity,
                         "memory_budget_gib": budget_gib, "gpu_memory_gib": gpu_memory_gib,
                         "device_name": runner.device_name})
            if on_row is not None:
                on_row(rows[-1])
    finally:
        runner.close()
    return rows


# -------------------------------------------------------------------------------------------- output
def against_full_line(method: str, full_row: dict) -> str:
    r = full_row
    ratio = lambda key: f"{r[key]:.2f}x [{r[key + '_q1']:.2f}, {r[key + '_q3']:.2f}]"  # noqa: E731
    floor = r["floor_bw_vs_full"]
    return (f"{method} vs full fine-tuning (both gated, p=0): FW {ratio('fw_vs_full')}, BW {ratio('bw_vs_full')},"
            f" total {ratio('total_vs_full')}; median [quartiles] of {r['timed_rounds']} paired rounds"
            + ("" if floor is None else f"; input-gradient floor BW {floor:.2f}x full"))


def baseline_name(row: dict) -> str:
    return "the unpatched Transformers model" if row.get("framework") == "hf" else "plain litgpt"


def markdown(rows: list) -> str:
    lines = ["| Method | Variant | FW ms | BW ms | Total ms | Reduction | Theory | Achieved/theory | BW efficiency"
             " | Saved activations | Peak GiB | ATen ops/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"pld": "PLD 0->0.5 (end of schedule)", "all": "all dropped (head only)",
             "frozen": "every weight frozen (input gradients only), p=0", "full": "full fine-tuning (gated), p=0"}
    for r in rows:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        saved = "–" if r["saved_bytes_ratio"] is None else f"{r['saved_bytes_ratio']:.3f}"
        name = f"{baseline_name(r)}, p=0" if r["variant"] == "plain" else names.get(r["variant"])
        lines.append(
            f"| {r['method']} | {name or 'DropBP ' + str(r['variant'])} | {r['fw_ms']:.1f}"
            f" | {r['bw_ms']:.1f} | {r['total_ms']:.1f} | {r['reduction']:+.0%} | {r['theory']:.0%}"
            f" | {fmt(r['achieved_over_theory'])} | {fmt(r['bw_efficiency'])} | {saved} | {r['peak_gib']:.3f}"
            f" | {r.get('aten_ops', '–')} |"
        )
    return "\n".join(lines)


def markdown_max_seq(rows: list) -> str:
    lines = ["| Method | Drop rate | Sampling | Max sequence length | First length that did not fit | Probes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        more = "+ (limit)" if r["limit_reached"] else ""
        found = "failed (see the log)" if r["max_seq_len"] is None else f"{r['max_seq_len']}{more}"
        lines.append(f"| {r['method']} | {r['rate']} | {r['sampling']} | {found}"
                     f" | {r['first_failure'] or '–'} | {len(r['probes'])} |")
    return "\n".join(lines)


def main(
    methods: tuple = ("full", "lora"),
    rates: tuple = (0.0, 0.5, 0.75, 0.875),
    model_name: Optional[str] = None,
    n_layer: int = 8,
    n_embd: int = 256,
    n_head: int = 4,
    vocab_size: int = 4096,
    seq_len: int = 256,
    micro_batch_size: int = 4,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    precision: str = "32-true",
    sampling: str = "fixed",
    compare_plain: bool = True,
    optimizer_step: bool = False,
    find_max_seq_len: bool = False,
    memory_budget: Optional[float] = None,
    gpu_memory_gib: Optional[float] = None,
    max_seq_start: int = 256,
    max_seq_limit: int = 16384,
    probe_steps: int = 3,
    granularity: int = 256,
    fresh_process_per_probe: bool = False,
    threads: Optional[int] = None,
    profile: bool = False,
    framework: str = "litgpt",
    compile: bool = False,
    input_grad_floor: bool = False,
    beside_full: bool = False,
    out: Optional[Path] = None,
) -> list:
    """Print the Table-5-style table (ms per sample, medians of rounds in shuffled order) with the gated-vs-plain
    overhead at p = 0, or with ``--find_max_seq_len`` the largest trainable sequence length per rate (Tables 2
    and 3); optionally write the rows as JSON.

    Args:
        model_name: a litgpt config name (e.g. Llama-2-7b-hf, random weights); else a LLaMA-architecture model of
            ``n_layer`` x ``n_embd`` with ``vocab_size``.
        steps: timed rounds; each round runs every variant once, in a shuffled order.
        warmup: untimed rounds after the first (which is untimed too); these rounds measure memory.
        sampling: "fixed" (same kept count each step) or "bernoulli".
        compare_plain: also time plain litgpt at p = 0 (the overhead of the gates); its memory is left out of
            our model's peak, and ours out of its.
        optimizer_step: include an AdamW step (moments created before the first step).
        memory_budget: GiB; a sequence length fits if the peak stays below it (on CPU this is how the search works).
        gpu_memory_gib: cap the CUDA allocator of every probe process at this many GiB
            (``torch.cuda.set_per_process_memory_fraction``), e.g. 80 to reproduce an 80 GiB A100 on a larger card.
        max_seq_start: first length of the doubling (a multiple of ``granularity``).
        max_seq_limit: longest length probed (the model's block size in the probes).
        probe_steps: training steps (AdamW included) per probe; every one must fit.
        granularity: the search bisects to this many tokens.
        fresh_process_per_probe: start a new probe process for every probe (slower). By default a probe process
            answers probes until one runs out of memory, and is then replaced.
        threads: torch CPU threads (default: torch's); probe processes use the same number.
        framework: "litgpt" (our lit_gpt models against plain litgpt) or "hf" (a Transformers LLaMA gated by
            dropbp.integrations.transformers against the unpatched one; --methods full/lora, Table 5 only).
        profile: instead of the table, profile one block at p = 0 against plain litgpt's (CPU, fp32): ATen ops
            (``torch.profiler``), Python calls (``cProfile``) and microseconds per block forward.
        compile: ``torch.compile`` our branch functions (as the recipes' ``--compile true``) and each block of plain
            litgpt (inductor, dynamic shapes); the untimed rounds compile. Table 5 rows of litgpt models only.
        input_grad_floor: also time a full model of the same shape with every weight frozen but the embedding, whose
            backward computes only input gradients: the floor under any PEFT method's backward at p = 0.
        beside_full: time full fine-tuning at p = 0 in the same rounds as each PEFT method, and print the PEFT
            method's FW, BW and total time over full's, paired by round (and the floor's BW over full's, with
            ``--input_grad_floor``).
    """
    if precision not in DTYPES:
        raise SystemExit(f"error: --precision must be one of {', '.join(DTYPES)}")
    if any(not 0.0 <= r < 1.0 for r in rates) or (not find_max_seq_len and 0.0 not in rates):
        raise SystemExit("error: --rates must lie in [0, 1) and include 0.0 (the baseline)")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible")
    if gpu_memory_gib is not None and device != "cuda":
        raise SystemExit("error: --gpu_memory_gib caps the CUDA allocator: it needs --device cuda")
    if find_max_seq_len and (granularity < 1 or max_seq_start % granularity or max_seq_start > max_seq_limit):
        raise SystemExit("error: --max_seq_start must be a multiple of --granularity and at most --max_seq_limit")
    if framework not in ("litgpt", "hf") or (framework == "hf" and (profile or find_max_seq_len)):
        raise SystemExit("error: --framework is litgpt or hf; hf measures the Table 5 rows only")
    if (compile or input_grad_floor or beside_full) and (framework == "hf" or profile or find_max_seq_len):
        raise SystemExit("error: --compile, --input_grad_floor and --beside_full time the Table 5 rows of litgpt"
                         " models")
    unsupported = compile_unsupported(quantized_on_cpu="qlora" in methods and device == "cpu") if compile else None
    if unsupported:
        raise SystemExit(f"error: --compile true times the Table 5 rows of litgpt models; it does not work with"
                         f" {unsupported}")
    if threads is not None:
        torch.set_num_threads(threads)
    dims = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size)
    if model_name is not None:
        dims = {}
    dtype = DTYPES[precision]
    what = model_name or f"LLaMA-architecture {n_layer} layers x {n_embd} wide, vocab {vocab_size}"
    if framework == "hf":
        what = f"Transformers LlamaForCausalLM (gated by dropbp.integrations.transformers), {n_layer} x {n_embd}"
    if profile:
        if model_name is not None or device != "cpu":
            raise SystemExit("error: --profile runs on the CPU with --n_layer/--n_embd/--vocab_size dims")
        rows = [profile_gates(m, dims, seq_len, micro_batch_size, rounds=max(steps, 1)) for m in methods]
        print(f"{what}, fp32, seq {seq_len}, micro-batch {micro_batch_size}, cpu, {torch.get_num_threads()} threads,"
              f" {max(steps, 1)} rounds in shuffled order")
        for r in rows:
            print(profile_line(r))
    elif find_max_seq_len:  # this process never touches the GPU: the probe processes do
        rows = []

        def keep(row: dict) -> None:
            rows.append(row)
            if out is not None:
                Path(out).write_text(json.dumps(rows, indent=2))

        for m in methods:
            find_max_seq(m, list(rates), model_name, dims, micro_batch_size, device, precision, sampling,
                         memory_budget, max_seq_start, max_seq_limit, probe_steps, granularity, gpu_memory_gib,
                         fresh_process_per_probe, on_row=keep)
        where = (next((r["device_name"] for r in rows if r["device_name"]), "cuda") if device == "cuda"
                 else f"cpu, {torch.get_num_threads()} threads")
        limits = [f"budget {memory_budget} GiB of measured peak" if memory_budget else None,
                  f"CUDA allocator capped at {gpu_memory_gib} GiB" if gpu_memory_gib else None]
        print(f"{what}, {precision}, micro-batch {micro_batch_size}, {where}, AdamW moments from the start,"
              f" {probe_steps} steps per probe, {'; '.join(x for x in limits if x) or 'until out of memory'},"
              f" bisection to {granularity} tokens")
        print(markdown_max_seq(rows))
    else:
        if device == "cuda" and gpu_memory_gib is not None:
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, gpu_memory_gib * GIB / torch.cuda.get_device_properties(0).total_memory))
        where = (f"cuda ({torch.cuda.get_device_name()})" if device == "cuda"
                 else f"cpu, {torch.get_num_threads()} threads")
        rows = []
        for m in methods:
            rows += benchmark(m, list(rates), model_name, dims, seq_len, micro_batch_size, steps, warmup, device,
                              dtype, sampling, compare_plain, optimizer_step, framework=framework, compile=compile,
                              input_grad_floor=input_grad_floor, beside_full=beside_full)
            gc.collect()  # the method's models go before the next one's are built
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{what}, {precision}, seq {seq_len}, micro-batch {micro_batch_size}, {where}, {sampling} sampling,"
              f" median of {steps} rounds, variant order shuffled each round (seed {ORDER_SEED})"
              f"{', compiled (torch.compile)' if compile else ''}")
        print(markdown(rows))
        for r in rows:
            if r["variant"] == "plain":
                ours = next(o for o in rows if o["method"] == r["method"] and o["variant"] == 0.0)
                print(overhead_line(r["method"], r, ours["aten_ops"]))
            if r["variant"] == "full":
                print(against_full_line(r["method"], r))
    if out is not None:
        Path(out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == PROBE_WORKER_FLAG:
        probe_worker(json.loads(sys.argv[2]))
    else:
        CLI(main, as_positional=False)
