"""The training loop every recipe shares: litgpt's fine-tuning loop with DropBP (or PLD) in it.

`fit` runs the optimizer steps of a :class:`Run`; a step is `micro_batch` for each accumulated micro-batch, then
`optimizer_step`, then `after_step` (sensitivity pass once, validation, checkpoint, time limit). Nothing in a
micro-batch waits for the device: losses and fw/bw times stay there (:class:`StepWindow`) and are read at log and
save steps, where divergence is checked too. On several ranks a step reduces gradients once, in its last
micro-batch, through DDP's or FSDP's own hooks: that micro-batch's dropped branches touch their weights
(``handler.touch_dropped``) so that every weight takes part, and the weights dropped in every micro-batch of the
step get their gradient set back to None before the optimizer.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import CycleIterator, chunked_cross_entropy
from tqdm import tqdm

from dropbp import DropBPHandler, PLDHandler
from dropbp.handler import clear_dropped_gradients
from dropbp.lr import compensate_lr, set_lr
from finetune.args import DropBPArgs
from finetune.checkpoint import save_on_interrupt, save_training_state, set_rng_state, training_state
from finetune.cli import Interrupted, UsageError
from finetune.evaluation import Example, validate
from finetune.sensitivity_pass import allocate, probe_batch
from finetune import signals
from finetune.signals import Stopped, deferred


@dataclass
class Run:
    """Everything the loop needs, made once by the trainer's set-up; ``progress`` is where the run stands."""

    fabric: L.Fabric
    method: Any  # trainer.Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    handler: DropBPHandler
    pld_handler: Optional[PLDHandler]
    train_loader: Any
    val_loader: Any
    train: TrainArgs
    eval: EvalArgs
    dropbp: DropBPArgs
    out_dir: Path
    accum: int  # micro-batches per optimizer step on each rank
    max_steps: float
    warmup: int
    base_lr: float
    example: Example
    record: dict
    progress: dict = field(default_factory=lambda: {"step": 0, "iter": 0, "best_val": None})


def fit(run: Run, restored_rng: Optional[dict] = None) -> None:
    fabric, progress = run.fabric, run.progress
    train_iter = CycleIterator(run.train_loader)
    for _ in range(progress["iter"]):  # resume: replay the data order up to where the saved run stopped
        next(train_iter)
    if restored_rng is not None:
        set_rng_state(restored_rng)

    bar = tqdm(total=run.max_steps if math.isfinite(run.max_steps) else None, initial=progress["step"],
               disable=fabric.global_rank != 0, desc=f"{run.method.name} p={run.dropbp.rate}", dynamic_ncols=True)
    write = bar.write if fabric.global_rank == 0 else (lambda line: None)  # below the bar, once
    state = training_state(run.handler, run.pld_handler, progress)  # as of the last completed step, for Ctrl-C
    try:
        train_steps(run, train_iter, bar, write, state)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (finetune/signals.py)
        bar.close()
        together = stop.together if isinstance(stop, Stopped) else fabric.world_size == 1
        saved = save_on_interrupt(fabric, run.model, run.optimizer, state, run.record, run.out_dir, together)
        raise Interrupted(saved, terminated=isinstance(stop, Stopped) and stop.terminated) from None
    bar.close()


def train_steps(run: Run, train_iter: CycleIterator, bar: tqdm, write: Callable[[str], None], state: dict) -> None:
    """Optimizer steps until ``max_steps``, the epochs or ``--train.max_time`` are reached."""
    fabric, progress = run.fabric, run.progress
    probe = probe_batch(train_iter.iterable, run.dropbp.probe_batch_size or run.train.micro_batch_size, fabric)
    window = StepWindow(fabric.device)
    kept = torch.zeros(len(run.handler.gates), dtype=torch.bool)  # branches back-propagated in this optimizer step
    fit_t0 = time.perf_counter()
    if progress.pop("after_step_pending", False):  # saved by a stop in the step's after_step: finish that first
        after_step(run, probe, write)
        state.update(training_state(run.handler, run.pld_handler, progress))
    while progress["step"] < run.max_steps:
        if run.train.epochs is not None and train_iter.epoch >= run.train.epochs:
            break
        step_t0 = time.perf_counter()
        for _ in range(run.accum):
            micro_batch(run, next(train_iter), window, kept)
        saving = run.train.save_interval is not None and (progress["step"] + 1) % run.train.save_interval == 0
        with deferred():  # a stop saves (and logs) this step only once the state saved with it describes it too
            lr = optimizer_step(run, kept)
            state.update(training_state(run.handler, run.pld_handler, progress))
            # A stop in after_step (validation, the sample, the sensitivity pass) saves this step's weights: the
            # resumed run runs after_step first. after_step never draws from the RNGs that the state holds.
            state["progress"]["after_step_pending"] = True
            if progress["step"] % run.train.log_interval == 0 or saving:  # values are read here, and only here
                report(run, window, bar, lr, train_iter.epoch, time.perf_counter() - step_t0)
        if window.stop_signal:  # several processes: a signal that every rank now knows of stops them all here
            raise Stopped(window.stop_signal, together=True)
        window.reset()
        bar.update(1)
        after_step(run, probe, write)
        state.update(training_state(run.handler, run.pld_handler, progress))
        if saving:
            save_training_state(fabric, run.model, run.optimizer, state, run.record, run.out_dir)
        if out_of_time(run, time.perf_counter() - fit_t0):
            write(f"--train.max_time {run.train.max_time:g}s reached after step {progress['step']}: stopping")
            break
    window.check_finite(fabric, run.accum)  # before final/ is written


def micro_batch(run: Run, batch: dict, window: "StepWindow", kept: torch.Tensor) -> None:
    """Forward and backward of one micro-batch, with its drop mask drawn first; the gradients are reduced over the
    ranks in the step's last one only."""
    fabric, handler, pld_handler, progress = run.fabric, run.handler, run.pld_handler, run.progress
    progress["iter"] += 1
    is_accumulating = progress["iter"] % run.accum != 0
    if pld_handler is not None:
        pld_handler.sample(progress["step"])
    if run.dropbp.rate > 0 or pld_handler is None:
        handler.sample()
    kept |= handler.kept
    handler.touch_dropped(fabric.world_size > 1 and not is_accumulating)

    window.mark()
    with fabric.no_backward_sync(run.model, enabled=is_accumulating):
        loss = micro_batch_loss(run.model, batch)
        window.mark()
        # No graph when the kept branches hold nothing trainable (LoRA on q and v only, every branch dropped) in a
        # micro-batch that does not reduce: it adds nothing to any gradient.
        if loss.requires_grad:
            fabric.backward(loss / run.accum)
        window.mark()
    window.add(loss.detach(), progress["iter"],
               handler.realised_rate if pld_handler is None else pld_handler.skipped_fraction)


def optimizer_step(run: Run, kept: torch.Tensor) -> float:
    """The scheduled learning rate, clipping and the optimizer step; returns the learning rate."""
    lr = lr_at(run.progress["step"], run.base_lr, run.warmup, run.max_steps, run.train.min_lr)
    set_lr(run.optimizer, lr)
    if run.fabric.world_size > 1:
        clear_dropped_gradients(run.handler, kept)
    if run.train.max_norm is not None:
        run.fabric.clip_gradients(run.model, run.optimizer, max_norm=run.train.max_norm)
    kept[:] = False
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress["step"] += 1
    return lr


def report(run: Run, window: "StepWindow", bar: tqdm, lr: float, epoch: int, step_time: float) -> None:
    """Read the step's values (checking for divergence first), log them at log steps and show them on the bar."""
    progress = run.progress
    metrics = window.read(run.fabric, run.accum)
    metrics.update(step=progress["step"], iter=progress["iter"], learning_rate=lr, epoch=epoch, step_time=step_time)
    now = time.perf_counter()  # after the read: the device has finished this step, so the mean is a true wall time
    if window.last_read is not None:  # wall time per step since the last read, validation and checkpoints included
        then, step = window.last_read
        metrics["mean_step_time"] = (now - then) / (progress["step"] - step)
    window.last_read = (now, progress["step"])
    if progress["step"] % run.train.log_interval == 0:
        run.fabric.log_dict(metrics, step=progress["step"])
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", fw=f"{metrics['forward_time']*1e3:.0f}ms",
                    bw=f"{metrics['backward_time']*1e3:.0f}ms", drop=f"{metrics['drop_rate']:.2f}")


def after_step(run: Run, probe: dict, write: Callable[[str], None]) -> None:
    """The sensitivity pass (once, at ``--dropbp.sensitivity_at``) and validation at ``--eval.interval``."""
    fabric, model, handler, dropbp, step = run.fabric, run.model, run.handler, run.dropbp, run.progress["step"]
    allocate_at = int(dropbp.sensitivity_at * run.max_steps) if math.isfinite(run.max_steps) else None
    needs_allocation = dropbp.rate > 0 and dropbp.allocation == "sensitivity" and run.pld_handler is None
    if needs_allocation and not handler.allocated and allocate_at is not None and step >= allocate_at:
        t0 = time.perf_counter()
        metric = dropbp.sensitivity if dropbp.sensitivity != "auto" else ("gradnorm" if run.method.full else "grad")
        allocate(fabric, model, handler, lambda: micro_batch_loss(model, probe), probe["input_ids"].size(1), dropbp,
                 metric, run.out_dir, step, write)
        compensate_lr(run.optimizer, handler, enabled=dropbp.lr_compensation, accum=run.accum)
        fabric.log_dict({"sensitivity_time": time.perf_counter() - t0}, step=step)
    if step % run.eval.interval == 0:
        val_loss = validate(fabric, model, run.val_loader, run.eval.max_iters, run.pld_handler)
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=step)
        write(f"step {step}: val loss {val_loss:.4f}")
        run.example.generate(fabric, model, write)


def out_of_time(run: Run, elapsed: float) -> bool:
    """``--train.max_time`` (seconds of wall time since training started, as litgpt), decided alike on every rank."""
    max_time = run.train.max_time or math.inf
    late = elapsed > max_time
    if math.isfinite(max_time) and run.fabric.world_size > 1:  # every rank stops after the same step
        late = bool(run.fabric.all_reduce(torch.tensor(float(late)), reduce_op="max").item())
    return late


class StepWindow:
    """One optimizer step's loss, forward and backward times and drop rate, kept on the device until read: reading a
    value waits for the device, so the loop reads only at log and save steps (``read``). Times come from CUDA events
    on a GPU (recorded, never waited for, in the loop) and from the wall clock on a CPU. The first non-finite loss
    since the last check is remembered on the device (its micro-batch), and ``read``/``check_finite`` stop the run on
    every rank, before anything is saved, when any rank had one. On several ranks the same reduction also tells
    every rank of a stop signal that any of them holds (``stop_signal``: see finetune/signals.py)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.bad_iter = torch.full((), -1, dtype=torch.int64, device=device)  # first micro-batch with a bad loss
        self.last_read: Optional[tuple] = None  # (wall time, step) of the last read: see report's mean_step_time
        self.stop_signal = 0  # a signal held on some rank, known to every rank since the last read
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.drop, self.marks = None, 0, 0.0, []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def add(self, loss: torch.Tensor, micro_batch: int, drop_rate: float) -> None:
        self.loss = loss if self.loss is None else self.loss + loss
        self.n += 1
        self.drop += drop_rate
        fresh = ~torch.isfinite(loss) & (self.bad_iter < 0)
        self.bad_iter = torch.where(fresh, micro_batch, self.bad_iter)

    def read(self, fabric, accum: int) -> dict:
        self.check_finite(fabric, accum)
        marks = self.marks
        if self.cuda:
            marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        else:
            spans = [b - a for a, b in zip(marks, marks[1:])]
        return {"loss": self.loss.item() / self.n, "forward_time": sum(spans[0::3]),
                "backward_time": sum(spans[1::3]), "drop_rate": self.drop / self.n}

    def check_finite(self, fabric, accum: int) -> None:
        mine = self.bad_iter
        if fabric.world_size > 1:  # every rank stops together: the others would wait forever in the next collective
            never = torch.iinfo(torch.int64).max
            held = torch.tensor(-signals.held(), dtype=torch.int64, device=mine.device)  # SIGTERM wins the min
            reduced = fabric.all_reduce(torch.stack([torch.where(mine < 0, never, mine), held]), reduce_op="min")
            first, stop = reduced.tolist()  # one read of the device for both
            first, self.stop_signal = (-1 if first == never else first), -stop
        else:
            first = int(mine.item())
        if first >= 0:
            where = "here" if int(mine.item()) == first else "on another rank"
            raise UsageError(f"non-finite loss in step {(first - 1) // accum + 1} (micro-batch {first}, {where}):"
                             " stopping; the checkpoints saved so far are intact")


def micro_batch_loss(model, batch) -> torch.Tensor:
    input_ids, targets = batch["input_ids"], batch["labels"]
    logits = model(input_ids, lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n+1
    return chunked_cross_entropy(logits, targets[..., 1:])


def lr_at(step: int, base_lr: float, warmup: int, max_steps: float, min_lr: float) -> float:
    """Linear warm-up then cosine decay to min_lr (litgpt's schedule shape)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if not math.isfinite(max_steps):
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def weight_fingerprints(fabric, model) -> torch.Tensor:
    """One number per trainable tensor that changes whenever the tensor does: its sum in float64 (no full-size copy;
    under FSDP the shards' sums, added up over ranks)."""
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters() if p.requires_grad])
    if isinstance(fabric.strategy, FSDPStrategy):
        sums = fabric.all_reduce(sums, reduce_op="sum")
    return sums.cpu()


def report_moved(fabric, before: torch.Tensor, after: torch.Tensor) -> None:
    """How many trainable tensors training changed; a run that changed none learned nothing, whatever its exit
    status, and says so."""
    moved = int((before != after).sum())
    fabric.print(f"Trainable tensors changed by training: {moved} of {len(before)}")
    if moved == 0:
        fabric.print("warning: no trainable weight changed: this run learned nothing (a learning rate of 0? no"
                     " optimizer step?)")
