"""Probe processes for the max-sequence-length search (``scripts/benchmark.py --find_max_seq_len true``).

A probe (a few training steps at one length, AdamW moments created before the first) never runs in the searching
process: it runs in a probe process, this file run as ``python scripts/bench_probe.py --probe_worker '<spec>'``,
which answers probes (JSON lines on stdin, one ``PROBE_RESULT {json}`` line each on stdout) until one runs out of
memory, and is then replaced: a process that once ran out of GPU memory cannot be trusted afterwards. The spec is a
JSON object: the model (method, model_name, dims, block_size, device, precision), the probe (sampling,
micro_batch_size, probe_steps, budget_bytes), gpu_memory_gib and threads.
"""

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

import torch

from dropbp import DropBPHandler
from scripts.bench_model import ModelSpec, build, quantize
from scripts.bench_step import GIB, Step

PROBE_WORKER_FLAG = "--probe_worker"  # this file as a probe process (see ProbeWorker)
RESULT_PREFIX = "PROBE_RESULT "


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
        device = spec["device"]
        self.cap_bytes = spec.get("budget_bytes")
        if device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            cap = total
            if spec.get("gpu_memory_gib"):  # a smaller card on a larger one: the allocator refuses beyond the cap
                cap = int(spec["gpu_memory_gib"] * GIB)
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
            self.cap_bytes = min(cap, self.cap_bytes or cap)
        model = ModelSpec(spec["method"], spec["model_name"], spec["dims"], device, spec["precision"])
        self.model = quantize(model, build(model, spec["block_size"]))
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
    """The ``--probe_worker`` mode: read probe requests (JSON lines) from stdin, answer each with one line
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
    """The parent's handle on one probe process: ``python scripts/bench_probe.py --probe_worker '<spec>'``."""

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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != PROBE_WORKER_FLAG:
        raise SystemExit(f"usage: python {sys.argv[0]} {PROBE_WORKER_FLAG} '<spec as JSON>' (started by ProbeWorker)")
    probe_worker(json.loads(sys.argv[2]))
