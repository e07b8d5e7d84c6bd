"""Optional learning-rate compensation 1/(1 - p_i) (described in the paper's text; off by default).

A branch dropped with probability p_i updates its parameters only a fraction 1 - p_i of the steps; scaling their
learning rate by 1/(1 - p_i) restores the expected update size. The optimizer gets one parameter group per gate
(plus one for everything else), each with an ``lr_scale``; a schedule composes with it by setting
``group["lr"] = schedule_lr * group["lr_scale"]`` (see :func:`set_lr`).
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


def compensate_lr(optimizer: torch.optim.Optimizer, handler: DropBPHandler, enabled: bool = True) -> None:
    """Set each group's ``lr_scale`` to 1/(1 - p_i) of its gate (1.0 when disabled or for the rest group).
    Call again after the rates change (sensitivity allocation)."""
    for group in optimizer.param_groups:
        gate = group.get("dropbp_gate")
        group["lr_scale"] = 1.0 / (1.0 - float(handler.rates[gate])) if (enabled and gate is not None) else 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the schedule's learning rate to every group, times the group's compensation scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
