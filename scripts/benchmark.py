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

This file is the command line; the parts: ``bench_model.py`` (the models: gated, plain, quantized),
``bench_hf_model.py`` (the Transformers LLaMA of ``--framework hf``), ``bench_step.py`` (one training step timed and
measured), ``bench_time_per_sample.py`` (Table 5's rounds and rows), ``bench_gate_profile.py`` (``--profile``),
``bench_probe.py`` (probe processes) and ``bench_max_seq.py`` (the length search), ``bench_tables.py`` (the output).
"""

import gc
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch
from jsonargparse import CLI

from lit_gpt.gated import compile_unsupported
from scripts.bench_gate_profile import profile_gates
from scripts.bench_max_seq import MaxSeqPlan, find_max_seq
from scripts.bench_model import DTYPES, ModelSpec
from scripts.bench_step import GIB
from scripts.bench_tables import against_full_line, markdown, markdown_max_seq, overhead_line, profile_line
from scripts.bench_time_per_sample import ORDER_SEED, TimingPlan, time_per_sample


def print_gate_profile(methods: tuple, dims: dict, seq_len: int, micro_batch_size: int, rounds: int, what: str) -> list:
    rows = [profile_gates(m, dims, seq_len, micro_batch_size, rounds=rounds) for m in methods]
    print(f"{what}, fp32, seq {seq_len}, micro-batch {micro_batch_size}, cpu, {torch.get_num_threads()} threads,"
          f" {rounds} rounds in shuffled order")
    for r in rows:
        print(profile_line(r))
    return rows


def print_max_seq(methods: tuple, spec: ModelSpec, plan: MaxSeqPlan, what: str, out: Optional[Path]) -> list:
    """This process never touches the GPU: the probe processes do. ``out`` is rewritten after every rate."""
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        if out is not None:
            Path(out).write_text(json.dumps(rows, indent=2))

    for m in methods:
        find_max_seq(replace(spec, method=m), plan, on_row=keep)
    device, precision = spec.device, spec.precision
    where = (next((r["device_name"] for r in rows if r["device_name"]), "cuda") if device == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    limits = [f"budget {plan.budget_gib} GiB of measured peak" if plan.budget_gib else None,
              f"CUDA allocator capped at {plan.gpu_memory_gib} GiB" if plan.gpu_memory_gib else None]
    print(f"{what}, {precision}, micro-batch {plan.micro_batch_size}, {where}, AdamW moments from the start,"
          f" {plan.probe_steps} steps per probe, {'; '.join(x for x in limits if x) or 'until out of memory'},"
          f" bisection to {plan.granularity} tokens")
    print(markdown_max_seq(rows))
    return rows


def print_time_per_sample(methods: tuple, spec: ModelSpec, plan: TimingPlan, what: str,
                          gpu_memory_gib: Optional[float]) -> list:
    device, precision = spec.device, spec.precision
    if device == "cuda" and gpu_memory_gib is not None:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, gpu_memory_gib * GIB / torch.cuda.get_device_properties(0).total_memory))
    where = (f"cuda ({torch.cuda.get_device_name()})" if device == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    rows = []
    for m in methods:
        rows += time_per_sample(replace(spec, method=m), plan)
        gc.collect()  # the method's models go before the next one's are built
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"{what}, {precision}, seq {plan.seq_len}, micro-batch {plan.micro_batch_size}, {where}, {plan.sampling}"
          f" sampling, median of {plan.steps} rounds, variant order shuffled each round (seed {ORDER_SEED})"
          f"{', compiled (torch.compile)' if spec.compile else ''}")
    print(f"times in ms per sample: a step of micro-batch {plan.micro_batch_size} takes {plan.micro_batch_size}x them")
    print(markdown(rows))
    for r in rows:
        if r["variant"] == "plain":
            ours = next(o for o in rows if o["method"] == r["method"] and o["variant"] == 0.0)
            print(overhead_line(r["method"], r, ours["aten_ops"]))
        if r["variant"] == "full":
            print(against_full_line(r["method"], r))
    return rows


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
    spec = ModelSpec(model_name=model_name, dims=dims, device=device, precision=precision, framework=framework,
                     compile=compile)  # the method: each of --methods in turn
    what = model_name or f"LLaMA-architecture {n_layer} layers x {n_embd} wide, vocab {vocab_size}"
    if framework == "hf":
        what = f"Transformers LlamaForCausalLM (gated by dropbp.integrations.transformers), {n_layer} x {n_embd}"
    if profile:
        if model_name is not None or device != "cpu":
            raise SystemExit("error: --profile runs on the CPU with --n_layer/--n_embd/--vocab_size dims")
        rows = print_gate_profile(methods, dims, seq_len, micro_batch_size, max(steps, 1), what)
    elif find_max_seq_len:
        plan = MaxSeqPlan(list(rates), micro_batch_size, sampling, memory_budget, max_seq_start, max_seq_limit,
                          probe_steps, granularity, gpu_memory_gib, fresh_process_per_probe)
        rows = print_max_seq(methods, spec, plan, what, out)
    else:
        plan = TimingPlan(list(rates), seq_len, micro_batch_size, steps, warmup, sampling, compare_plain,
                          optimizer_step, input_grad_floor=input_grad_floor, beside_full=beside_full)
        rows = print_time_per_sample(methods, spec, plan, what, gpu_memory_gib)
    if out is not None:
        Path(out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    CLI(main, as_positional=False)
