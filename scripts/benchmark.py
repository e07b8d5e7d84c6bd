"""Time per sample with DropBP, split into forward and backward, in the layout of the paper's Table 5.

Variants are interleaved (p=0, p=0.5, ..., p=0, p=0.5, ...) and medians reported, because shared machines are
noisy. Besides the total reduction against appendix B's theory (full: 2/3 p, PEFT: 1/2 p) it reports the
backward-saving efficiency (BW(0) - BW(p)) / (p * (BW(0) - BW(1))), where BW(1) is the never-droppable part
(embedding, final norm, head, loss), measured with every branch dropped.

    python scripts/benchmark.py --n_layer 8 --n_embd 256 --seq_len 256 --micro_batch_size 4
"""

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch
from jsonargparse import CLI

import lit_gpt.lora
import lit_gpt.model
from dropbp import DropBPHandler

THEORY = {"full": 2 / 3, "lora": 1 / 2}


def build(method: str, n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int, device: str):
    common = dict(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_query_groups=n_head, block_size=seq_len,
        vocab_size=vocab_size, padded_vocab_size=vocab_size, intermediate_size=int(n_embd * 8 / 3) // 64 * 64 or 64,
    )
    if method == "full":
        model = lit_gpt.model.GPT(lit_gpt.model.Config.from_name("Llama-2-7b-hf", **common))
    else:
        config = lit_gpt.lora.Config.from_name(
            "Llama-2-7b-hf", **common, lora_r=8, lora_alpha=16, lora_query=True, lora_key=True, lora_value=True,
            lora_projection=True, lora_mlp=True,
        )
        model = lit_gpt.lora.GPT(config)
        lit_gpt.lora.mark_only_lora_as_trainable(model)
    return model.to(device)


def timed_step(model, handler, x, y, mask, device: str) -> tuple:
    """Forward and backward time (s) and bytes saved for backward, for one micro-batch with the given mask."""
    handler.set_mask(mask)
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t):  # activation bytes only: weights saved for backward are not activation memory
        nonlocal saved
        if t.data_ptr() not in params:
            saved += t.numel() * t.element_size()
        return t

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    sync()
    t1 = time.perf_counter()
    if loss.requires_grad:  # LoRA with every branch dropped has nothing to back-propagate: skipped, as in training
        loss.backward()
    sync()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, saved


def benchmark(method: str, rates: list, n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int,
              micro_batch_size: int, steps: int, warmup: int, device: str, seed: int = 0) -> list:
    torch.manual_seed(seed)
    model = build(method, n_layer, n_embd, n_head, vocab_size, seq_len, device)
    handler = DropBPHandler(model, rate=0.0, sampling="fixed", seed=seed)
    x = torch.randint(0, vocab_size, (micro_batch_size, seq_len), device=device)
    y = torch.randint(0, vocab_size, (micro_batch_size, seq_len), device=device)
    variants = [*rates, 1.0]  # 1.0: every branch dropped (the undroppable head)
    times = {r: {"fw": [], "bw": [], "saved": 0} for r in variants}
    for i in range(warmup + steps):
        for r in variants:  # interleaved
            if r < 1.0:
                handler.set_rates(r)
                mask = handler.sample()
            else:
                mask = torch.ones(len(handler.gates), dtype=torch.bool)
            fw, bw, saved = timed_step(model, handler, x, y, mask, device)
            if i >= warmup:
                times[r]["fw"].append(fw)
                times[r]["bw"].append(bw)
                times[r]["saved"] = saved
    per_sample = lambda xs: 1000 * statistics.median(xs) / micro_batch_size  # noqa: E731
    bw0, bw1 = per_sample(times[0.0]["bw"]), per_sample(times[1.0]["bw"])
    total0 = per_sample(times[0.0]["fw"]) + bw0
    rows = []
    for r in variants:
        fw, bw = per_sample(times[r]["fw"]), per_sample(times[r]["bw"])
        reduction = 1 - (fw + bw) / total0
        theory = THEORY[method] * r
        rows.append({
            "method": method, "rate": r, "fw_ms": fw, "bw_ms": bw, "total_ms": fw + bw,
            "fw_spread_ms": 1000 * (max(times[r]["fw"]) - min(times[r]["fw"])) / micro_batch_size,
            "bw_spread_ms": 1000 * (max(times[r]["bw"]) - min(times[r]["bw"])) / micro_batch_size,
            "reduction": reduction, "theory": theory, "achieved_over_theory": reduction / theory if r else None,
            "bw_efficiency": (bw0 - bw) / (r * (bw0 - bw1)) if 0 < r < 1 else None,
            "saved_bytes_ratio": times[r]["saved"] / times[0.0]["saved"],
        })
    return rows


def markdown(rows: list) -> str:
    lines = ["| Method | Drop rate | FW ms | BW ms | Total ms | Reduction | Theory | Achieved/theory | BW efficiency"
             " | Saved activations |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "all dropped (head only)" if r["rate"] == 1.0 else r["rate"]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | {label} | {r['fw_ms']:.1f} | {r['bw_ms']:.1f} | {r['total_ms']:.1f} |"
            f" {r['reduction']:+.0%} | {r['theory']:.0%} | {fmt(r['achieved_over_theory'])} |"
            f" {fmt(r['bw_efficiency'])} | {r['saved_bytes_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(
    methods: tuple = ("full", "lora"),
    rates: tuple = (0.0, 0.5, 0.75, 0.875),
    n_layer: int = 8,
    n_embd: int = 256,
    n_head: int = 4,
    vocab_size: int = 4096,
    seq_len: int = 256,
    micro_batch_size: int = 4,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    out: Optional[Path] = None,
) -> list:
    """Print the Table-5-style table (ms per sample, medians over interleaved steps) and optionally write JSON."""
    if 0.0 not in rates or any(not 0.0 <= r < 1.0 for r in rates):
        raise SystemExit("error: --rates must include 0.0 (the baseline) and lie in [0, 1)")
    rows = [
        row
        for m in methods
        for row in benchmark(m, list(rates), n_layer, n_embd, n_head, vocab_size, seq_len, micro_batch_size, steps,
                             warmup, device)
    ]
    print(f"{n_layer} layers x {n_embd} wide, vocab {vocab_size}, seq {seq_len}, micro-batch {micro_batch_size},"
          f" {device}, {torch.get_num_threads()} threads, fixed-budget sampling, median of {steps} interleaved steps")
    print(markdown(rows))
    if out is not None:
        Path(out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
