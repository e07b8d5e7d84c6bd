"""Invariant 10 on one process: nothing in a micro-batch waits for the device. With a GPU pretended (CUDA events
stand-ins), the loop records events but never synchronizes in a micro-batch, and reads floating-point tensors only
at log steps. (Several processes: tests/test_distributed.py counts the collectives per step.)"""

import sys
from pathlib import Path

import torch
from litgpt.args import EvalArgs, TrainArgs

from finetune import loop, lora, trainer
from finetune.args import DropBPArgs
from lit_gpt.data import Builtin
from tests.test_recipes import logged

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(f"{ROOT / folder}/" for folder in ("finetune", "dropbp", "lit_gpt"))  # not .venv/, also in ROOT
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
CPU_BY_DESIGN = ("dropbp/handler.py", "dropbp/pld.py")  # masks, rates, generators: CPU tensors, never the device's


class FakeEvent:
    """torch.cuda.Event as the loop uses it, on the CPU: records the wall clock; counts waits."""

    synchronized = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.t - self.t) * 1e3


def test_no_device_sync_or_float_read_in_the_micro_batch_loop(tmp_path, monkeypatch):
    counts = {"reads": 0, "synchronize": 0, "steps": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if counts.get("in_fit") and self.is_floating_point() and caller.startswith(PROJECT) and not (
                    caller.endswith(CPU_BY_DESIGN)):
                counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: counts.__setitem__("synchronize",
                                                                                 counts["synchronize"] + 1))

    class PretendGPUWindow(loop.StepWindow):
        def __init__(self, device):
            super().__init__(device)
            self.cuda = True  # CUDA events (the stand-ins above) for the fw/bw times

    monkeypatch.setattr(loop, "StepWindow", PretendGPUWindow)
    fit = trainer.fit

    def counting_fit(run, *args):
        optimizer = run.optimizer
        optimizer.optimizer.register_step_post_hook(lambda *_: counts.__setitem__("steps", counts["steps"] + 1))
        counts["in_fit"] = True
        try:
            fit(run, *args)
        finally:
            counts["in_fit"] = False

    monkeypatch.setattr(trainer, "fit", counting_fit)
    FakeEvent.synchronized = 0
    lora.setup(out_dir=tmp_path, data=Builtin(num_samples=96), dropbp=DropBPArgs(rate=0.5, allocation="uniform"),
               train=TrainArgs(global_batch_size=8, micro_batch_size=2, lr_warmup_steps=1, max_steps=10,
                               save_interval=None, log_interval=5, min_lr=0.0),
               eval=EvalArgs(interval=1000, max_iters=2, max_new_tokens=0))
    assert counts["steps"] == 10
    assert counts["synchronize"] == 0
    assert FakeEvent.synchronized == 2  # once per log step, where the times are read
    assert counts["reads"] / counts["steps"] <= 0.5, counts  # measured: 2 in 10 steps (the loss, at the log steps)
    rows = logged(tmp_path)
    assert sorted(rows) == [5, 10] and all(float(r["forward_time"]) > 0 and float(r["backward_time"]) > 0
                                           for r in rows.values())
    assert not rows[5]["mean_step_time"] and float(rows[10]["mean_step_time"]) > 0  # steps 6-10, timed after a read
