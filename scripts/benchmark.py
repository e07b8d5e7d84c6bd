"""Time per sample and memory with DropBP, in the layout of the paper's Tables 2, 3 and 5.

Variants are interleaved (p=0, p=0.5, ..., PLD, all-dropped, plain litgpt, then again) and medians reported, because
shared machines are noisy. Besides the total reduction against appendix B's theory (full: 2/3 p, PEFT: 1/2 p) it
reports the backward-saving efficiency (BW(0) - BW(p)) / (p * (BW(0) - BW(1))), where BW(1) is the
never-droppable part (embedding, final norm, head, loss), measured with every branch dropped, and the overhead of
our gated model at p = 0 against plain, unpatched litgpt on the same inputs.

    python scripts/benchmark.py --n_layer 8 --n_embd 256 --seq_len 256 --micro_batch_size 4
    python scripts/benchmark.py --model_name Llama-2-7b-hf --precision bf16-true --device cuda --seq_len 512 --micro_batch_size 2
    python scripts/benchmark.py --find_max_seq true --methods '[full]' --rates '[0.0, 0.875]' --memory_budget 2.0

Memory: on GPU the peak of ``torch.cuda.max_memory_allocated`` over a training step (optimizer step included when
``--optimizer_step``). On CPU torch keeps no allocator statistics, so "peak" is the model state (parameters,
gradients, and AdamW moments when ``--optimizer_step``) plus the activations saved for backward at the end of the
forward pass, which is where a training step peaks.
"""

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

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
from lit_gpt.gated import reset_adapter_cache

THEORY = {"full": 2 / 3, "lora": 1 / 2, "qlora": 1 / 2, "adapter": 1 / 2}
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
GIB = 2**30
PLD_STEADY_STATE = 10**9  # PLD evaluated at the end of its schedule (keep ratio theta_bar): the paper's "0 -> 0.5"


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


def build(method: str, model_name, dims, block_size, device, dtype, plain: bool = False):
    """Our gated model (or plain litgpt's, for the overhead comparison), trainable parameters marked as in the recipe."""
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
    return model


def quantize(method: str, model, dtype, device: str):
    """QLoRA: the frozen base in bitsandbytes NF4 (after any weight copying: 4-bit state dicts differ)."""
    if method != "qlora":
        return model
    from lit_gpt.quantize import quantize_frozen_linears

    return quantize_frozen_linears(model, "nf4", dtype, device=device)


# ------------------------------------------------------------------------------------------ measuring
class Step:
    """One training step (forward, backward, optionally AdamW) of a micro-batch, timed and memory-measured."""

    def __init__(self, model, device: str, optimizer_step: bool) -> None:
        self.model, self.device = model, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-9, foreach=False) if optimizer_step else None
        self.param_ptrs = {p.data_ptr() for p in model.parameters()}

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, x, y) -> dict:
        saved = 0

        def pack(t):  # activation bytes only: weights saved for backward are not activation memory
            nonlocal saved
            if t.data_ptr() not in self.param_ptrs:
                saved += t.numel() * t.element_size()
            return t

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset_adapter_cache(self.model)  # plain litgpt adapters otherwise fail on their second step
        self.sync()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = self.model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.sync()
        t1 = time.perf_counter()
        if loss.requires_grad:  # LoRA with every branch dropped has nothing to back-propagate: skipped, as in training
            loss.backward()
        self.sync()
        t2 = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return {"fw": t1 - t0, "bw": t2 - t1, "saved": saved, "peak": self.peak_bytes(saved)}

    def peak_bytes(self, saved: int) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = sum(p.numel() * p.element_size() for p in self.trainable)
        moments = 2 * grads if self.optimizer is not None else 0
        return params + grads + moments + saved


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


def benchmark(method: str, rates: list, model_name, dims: dict, seq_len: int, micro_batch_size: int, steps: int,
              warmup: int, device: str, dtype, sampling: str, compare_plain: bool, optimizer_step: bool) -> list:
    model = build(method, model_name, dims, seq_len, device, dtype)
    variants = [*rates, "pld", "all"]
    plain_step = None
    if compare_plain:
        plain = build(method, model_name, dims, seq_len, device, dtype, plain=True)
        plain.load_state_dict(model.state_dict())
        plain_step = Step(quantize(method, plain, dtype, device), device, optimizer_step)
        variants.append("plain")
    model = quantize(method, model, dtype, device)
    handler = DropBPHandler(model, sampling=sampling, seed=0)
    pld = PLDHandler(model, theta_bar=0.5, gamma=0.001, seed=0)
    step = Step(model, device, optimizer_step)
    vocab = model.config.padded_vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g).to(device)
    results = {v: [] for v in variants}
    for i in range(warmup + steps):
        for v in variants:  # interleaved, so drift in machine load hits every variant alike
            if v == "plain":
                out = plain_step(x, y)
            else:
                set_variant(v, handler, pld)
                out = step(x, y)
            if i >= warmup:
                results[v].append(out)
    pld.disable()
    return summarise(method, results, micro_batch_size)


def summarise(method: str, results: dict, micro_batch_size: int) -> list:
    def ms(v, key):  # median ms per sample
        return 1000 * statistics.median(r[key] for r in results[v]) / micro_batch_size

    def spread(v, key):
        values = [1000 * r[key] / micro_batch_size for r in results[v]]
        return max(values) - min(values)

    bw0, bw1 = ms(0.0, "bw"), ms("all", "bw")
    total0 = ms(0.0, "fw") + bw0
    saved0 = statistics.median(r["saved"] for r in results[0.0])
    rows = []
    for v in results:
        fw, bw = ms(v, "fw"), ms(v, "bw")
        rate = {"pld": 0.25, "all": 1.0, "plain": 0.0}.get(v, v)  # PLD 0 -> 0.5 drops 25% of the FLOPs on average
        reduction = 1 - (fw + bw) / total0
        theory = 0.25 if v == "pld" else THEORY[method] * rate
        rows.append({
            "method": method, "variant": v, "rate": rate, "fw_ms": fw, "bw_ms": bw, "total_ms": fw + bw,
            "fw_spread_ms": spread(v, "fw"), "bw_spread_ms": spread(v, "bw"),
            "reduction": reduction, "theory": theory, "achieved_over_theory": reduction / theory if theory else None,
            "bw_efficiency": (bw0 - bw) / (rate * (bw0 - bw1)) if isinstance(v, float) and 0 < v < 1 else None,
            "saved_bytes_ratio": statistics.median(r["saved"] for r in results[v]) / saved0,
            "peak_gib": max(r["peak"] for r in results[v]) / GIB,
        })
    return rows


# ------------------------------------------------------------------------------------- max seq length
def fits(method, model, step: Step, handler, variant, seq_len, micro_batch_size, probe_steps, budget_bytes, device):
    """Whether ``probe_steps`` training steps at ``seq_len`` run within the memory budget (and without OOM)."""
    vocab = model.config.padded_vocab_size
    x = torch.randint(0, vocab, (micro_batch_size, seq_len), device=device)
    try:
        for _ in range(probe_steps):  # with Bernoulli sampling the kept count, hence memory, varies per step
            handler.set_rates(variant)
            handler.sample()
            peak = step(x, x)["peak"]
            if budget_bytes is not None and peak > budget_bytes:
                return False
        return True
    except torch.cuda.OutOfMemoryError if device == "cuda" else MemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()


def find_max_seq(method, rates, model_name, dims, micro_batch_size, device, dtype, sampling, budget_gib,
                 start: int, limit: int, probe_steps: int, granularity: int) -> list:
    """Doubling from ``start`` until a probe fails (or ``limit``), then bisection to ``granularity`` tokens."""
    model = quantize(method, build(method, model_name, dims, limit, device, dtype), dtype, device)
    handler = DropBPHandler(model, sampling=sampling, seed=0)
    step = Step(model, device, optimizer_step=True)
    budget = None if budget_gib is None else budget_gib * GIB
    rows = []
    for rate in rates:
        probe = lambda n: fits(method, model, step, handler, rate, n, micro_batch_size, probe_steps, budget, device)  # noqa: E731
        good, bad = 0, None
        n = start
        while n <= limit and probe(n):
            good, n = n, 2 * n
        bad = n if n <= limit else None
        while bad is not None and bad - good > granularity:
            mid = (good + bad) // 2 // granularity * granularity or granularity
            if mid in (good, bad):
                break
            good, bad = (mid, bad) if probe(mid) else (good, mid)
        rows.append({"method": method, "rate": rate, "sampling": sampling, "max_seq_len": good,
                     "limit_reached": bad is None, "memory_budget_gib": budget_gib})
    return rows


# -------------------------------------------------------------------------------------------- output
def markdown(rows: list) -> str:
    lines = ["| Method | Variant | FW ms | BW ms | Total ms | Reduction | Theory | Achieved/theory | BW efficiency"
             " | Saved activations | Peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"pld": "PLD 0->0.5", "all": "all dropped (head only)", "plain": "plain litgpt, p=0"}
    for r in rows:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | {names.get(r['variant'], 'DropBP ' + str(r['variant']))} | {r['fw_ms']:.1f}"
            f" | {r['bw_ms']:.1f} | {r['total_ms']:.1f} | {r['reduction']:+.0%} | {r['theory']:.0%}"
            f" | {fmt(r['achieved_over_theory'])} | {fmt(r['bw_efficiency'])} | {r['saved_bytes_ratio']:.3f}"
            f" | {r['peak_gib']:.3f} |"
        )
    return "\n".join(lines)


def markdown_max_seq(rows: list) -> str:
    lines = ["| Method | Drop rate | Sampling | Max sequence length |", "|---|---|---|---|"]
    for r in rows:
        more = "+ (limit)" if r["limit_reached"] else ""
        lines.append(f"| {r['method']} | {r['rate']} | {r['sampling']} | {r['max_seq_len']}{more} |")
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
    max_seq_start: int = 256,
    max_seq_limit: int = 16384,
    probe_steps: int = 3,
    granularity: int = 64,
    out: Optional[Path] = None,
) -> list:
    """Print the Table-5-style table (ms per sample, medians of interleaved steps), or with ``--find_max_seq_len``
    the largest trainable sequence length per rate (Tables 2 and 3); optionally write the rows as JSON.

    Args:
        model_name: a litgpt config name (e.g. Llama-2-7b-hf, random weights); else a LLaMA-architecture model of
            ``n_layer`` x ``n_embd`` with ``vocab_size``.
        sampling: "fixed" (same kept count each step) or "bernoulli".
        compare_plain: also time plain litgpt at p = 0 (the overhead of the gates); needs a second model in memory.
        optimizer_step: include an AdamW step (and its moments in the CPU memory figure).
        memory_budget: GiB; a sequence length fits if the peak stays below it (on CPU this is how the search works).
    """
    if precision not in DTYPES:
        raise SystemExit(f"error: --precision must be one of {', '.join(DTYPES)}")
    if any(not 0.0 <= r < 1.0 for r in rates) or (not find_max_seq_len and 0.0 not in rates):
        raise SystemExit("error: --rates must lie in [0, 1) and include 0.0 (the baseline)")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible")
    dims = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size)
    if model_name is not None:
        dims = {}
    dtype = DTYPES[precision]
    where = f"{device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {torch.get_num_threads()} threads")
    what = model_name or f"LLaMA-architecture {n_layer} layers x {n_embd} wide, vocab {vocab_size}"
    if find_max_seq_len:
        rows = [row for m in methods for row in find_max_seq(
            m, list(rates), model_name, dims, micro_batch_size, device, dtype, sampling, memory_budget,
            max_seq_start, max_seq_limit, probe_steps, granularity)]
        print(f"{what}, {precision}, micro-batch {micro_batch_size}, {where}, {probe_steps} steps per probe,"
              f" budget {memory_budget} GiB" if memory_budget else f"{what}, {where}, until out of memory")
        print(markdown_max_seq(rows))
    else:
        rows = [row for m in methods for row in benchmark(
            m, list(rates), model_name, dims, seq_len, micro_batch_size, steps, warmup, device, dtype, sampling,
            compare_plain, optimizer_step)]
        print(f"{what}, {precision}, seq {seq_len}, micro-batch {micro_batch_size}, {where}, {sampling} sampling,"
              f" median of {steps} interleaved steps")
        print(markdown(rows))
        for m in methods:
            ours = next(r for r in rows if r["method"] == m and r["variant"] == 0.0)
            plain = next((r for r in rows if r["method"] == m and r["variant"] == "plain"), None)
            if plain is not None:
                print(f"{m}: gated model at p=0 vs plain litgpt: {ours['total_ms'] / plain['total_ms'] - 1:+.1%} time")
    if out is not None:
        Path(out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
