"""Measuring one training step: its forward and backward time, its memory peak (the CUDA allocator's, or on the CPU
the model state plus the activations saved for backward), and the ATen operators it dispatches (``torch.profiler``).
"""

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable

import torch

from lit_gpt.gated import reset_adapter_cache

GIB = 2**30


def size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


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
