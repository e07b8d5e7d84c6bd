"""Optional learning-rate compensation for dropped branches (the paper's text mentions 1/(1 - p_i); off by default).

Gradient semantics without compensation. A step accumulates ``accum`` micro-batches, each back-propagated with
loss / accum. A micro-batch in which branch i is kept adds 1/accum of its gradient to the branch's parameters, one
in which it is dropped adds nothing, so the expected accumulated gradient of branch i is (1 - p_i) times the full
one. If the branch is dropped in every micro-batch of the step (probability p_i ** accum: the draws of successive
micro-batches are independent, in both sampling modes) its parameters get no gradient and the optimizer leaves
them and their state (Adam moments, step count) untouched that step.

What the compensation restores: the expected displacement of the branch's parameters per optimizer step, relative
to a run without dropping. It depends on the optimizer:

- Adaptive optimizers (AdamW, Adam, RMSprop, ...: anything but plain SGD) normalise the gradient, so a step's size
  barely depends on the gradient's magnitude: the (1 - p_i) shrink cancels (the moments see the same shrink), and
  what is lost is the steps in which the branch is not updated at all. The factor is 1 / P(updated) =
  1 / (1 - p_i ** accum). It is the paper's 1/(1 - p_i) at accum = 1; at accum = 64 and p_i = 0.9 it is 1.001,
  where 1/(1 - p_i) = 10 moves those parameters ~9x farther per step than a run without dropping (simulated
  AdamW, tests/test_pld_lr.py). It restores the lost updates, not the extra noise: an update built from fewer
  micro-batches is noisier, and Adam's normalised step is then somewhat shorter (~0.9x of the no-drop run's at
  accum 64, p_i = 0.9, per-micro-batch noise as large as the mean gradient; ~0.7x at three times that noise).
- SGD (with or without momentum) is linear in the gradient, so the expected update shrinks by (1 - p_i) whatever
  accum is: the factor is 1/(1 - p_i). SGD's weight decay is not shrunk: it acts in every step where the branch
  has a gradient (probability 1 - p_i ** accum), so scaled by the same 1/(1 - p_i) it would decay
  (1 - p_i ** accum) / (1 - p_i) times too much (~10x at p_i = 0.9, accum 64). Its coefficient is therefore scaled
  by (1 - p_i) / (1 - p_i ** accum): lr x weight decay x P(updated) is then the no-drop run's. (AdamW's decoupled
  decay needs nothing: it is scaled by the same 1 / P(updated) as its step.)

The optimizer gets one parameter group per gate (plus one for everything else), each with an ``lr_scale``; a
schedule composes with it by setting ``group["lr"] = schedule_lr * group["lr_scale"]`` (see :func:`set_lr`).
"""

from typing import Iterable

import torch

from dropbp.handler import DropBPHandler, gate_of_parameters


def param_groups(handler: DropBPHandler, params: Iterable[torch.nn.Parameter], **group_defaults) -> list:
    """Split trainable ``params`` into one group per gate (key ``dropbp_gate``) and a rest group (``None``).
    Parameters shared by several branches (a norm shared by parallel branches) stay in the rest group."""
    owner = gate_of_parameters(handler)
    groups: dict = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault(owner.get(id(p)), []).append(p)
    ordered = sorted(groups, key=lambda g: -1 if g is None else g)
    return [{"params": groups[g], "dropbp_gate": g, "lr_scale": 1.0, **group_defaults} for g in ordered]


def update_probability(rate: float, accum: int = 1) -> float:
    """Probability that a branch dropped with probability ``rate`` per micro-batch gets a gradient in an optimizer
    step of ``accum`` micro-batches: 1 - rate ** accum."""
    return 1.0 - float(rate) ** accum


def lr_scale(rate: float, accum: int = 1, adaptive: bool = True) -> float:
    """The compensation factor of one branch: 1 / (1 - rate ** accum) for an adaptive optimizer (AdamW),
    1 / (1 - rate) for SGD (see the module docstring)."""
    return 1.0 / update_probability(rate, accum if adaptive else 1)


def compensate_lr(
    optimizer: torch.optim.Optimizer, handler: DropBPHandler, enabled: bool = True, accum: int = 1
) -> None:
    """Set each group's ``lr_scale`` from its gate's drop rate p_i and the micro-batches per step ``accum``:
    1 / (1 - p_i ** accum), or 1 / (1 - p_i) when the optimizer is SGD, whose weight decay is then scaled by
    (1 - p_i) / (1 - p_i ** accum) (1.0 when disabled, and for the rest group). Call again after the rates change
    (sensitivity allocation)."""
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    adaptive = not isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        gate = group.get("dropbp_gate")
        rate = float(handler.rates[gate]) if enabled and gate is not None else 0.0
        group["lr_scale"] = lr_scale(rate, accum, adaptive)
        if not adaptive:  # SGD: decay as often as the branch is updated, not 1/(1 - p) times as strongly
            base = group.setdefault("base_weight_decay", group.get("weight_decay", 0.0))
            group["weight_decay"] = base * update_probability(rate) / update_probability(rate, accum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the schedule's learning rate to every group, times the group's compensation scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
