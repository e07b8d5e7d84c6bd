"""The gate: one per residual branch (attention or MLP) of a transformer block.

A model calls ``gate(branch_fn, *args)`` instead of ``branch_fn(*args)`` and adds the result to its residual
stream. The gate's state (``dropped``, ``skipped``, ``scale``) is set by a handler *before* the forward pass, so
the decision for a micro-batch is fixed in advance and is the same when activation checkpointing recomputes it.
"""

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


class DropBPGate(nn.Module):
    """Wraps one residual branch.

    - ``dropped`` (DropBP): the branch runs forward exactly but under ``torch.no_grad()``: it builds no graph,
      keeps no activations, and back-propagation does not enter it (gradients still flow through the residual).
    - ``skipped`` (Progressive Layer Dropping): the branch does not run at all; the gate returns ``None``.
    - ``scale``: multiplies a kept branch's output (PLD's 1/keep); 1.0 means untouched.
    - ``touch`` (several processes): a dropped or skipped branch adds ``0 * w[0, ..., 0]`` over its trainable
      weights ``w`` to its output (skipped: returns that zero). The forward value is unchanged, but each such weight
      takes part in backward with a zero gradient, so that a data-parallel wrapper reduces it in this backward:
      FSDP reduces a unit only if its weights took part, and its weights are reachable only inside its forward.

    The gate has no parameters or buffers, so wrapping a model leaves its state-dict keys unchanged.
    """

    def __init__(
        self, kind: str, layer: int = 0, flops: float = 1.0, branch_modules: Sequence[nn.Module] = ()
    ) -> None:
        super().__init__()
        self.kind = kind
        self.layer = layer
        self.flops = float(flops)
        # a tuple is not registered as a submodule: the gate must not duplicate the branch's state-dict entries
        self.branch_modules = tuple(branch_modules)
        self.dropped = False
        self.skipped = False
        self.scale = 1.0
        self.touch = False

    @property
    def passthrough(self) -> bool:
        """True when the gate changes nothing (not dropped, not skipped, unscaled): a model may then call the
        branch directly, without the gate, and dispatch exactly the ops of the ungated model (no overhead at p = 0).
        """
        return not (self.dropped or self.skipped) and self.scale == 1.0

    def forward(self, branch: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
        if self.skipped:
            return self.zero_term() if self.touch and torch.is_grad_enabled() else None
        if self.dropped and torch.is_grad_enabled():
            with torch.no_grad():
                out = branch(*args, **kwargs)
            zero = self.zero_term() if self.touch else None
            return out if zero is None else out + zero
        out = branch(*args, **kwargs)
        return out if self.scale == 1.0 else out * self.scale

    def zero_term(self) -> Optional[torch.Tensor]:
        """``0 * sum(w[0, ..., 0])`` over the branch's trainable weights (None when it has none): see ``touch``."""
        firsts = [p[(0,) * p.dim()].float() for p in self.branch_parameters() if p.requires_grad]
        return torch.stack(firsts).sum() * 0.0 if firsts else None  # 0-dim: adding it keeps the output's dtype

    def branch_parameters(self) -> list:
        """Parameters of the modules this branch runs (they get no gradient when the branch is dropped)."""
        seen, params = set(), []
        for module in self.branch_modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layer={self.layer}, flops={self.flops:.3g}"


def add_branch(branch_out: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``branch_out + x`` (that order, as litgpt writes it), or ``x`` when PLD skipped the branch."""
    return x if branch_out is None else branch_out + x


def find_gates(model: nn.Module) -> list:
    """Every gate of the model, in module order (block 0 attention, block 0 MLP, block 1 attention, ...)."""
    return [m for m in model.modules() if isinstance(m, DropBPGate)]


def no_gates_message(model: nn.Module, used_for: str) -> str:
    """What to do about a model without gates: a Transformers model (PEFT-wrapped too) needs ``install_gates``."""
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        how = "call dropbp.integrations.transformers.install_gates(model)"
    else:
        how = "build it from lit_gpt or add DropBPGate modules to its blocks"
    return f"the model has no DropBPGate: {how} before using {used_for}"
