"""The handler: holds per-branch drop rates and draws, once per micro-batch, which branches skip backward."""

from typing import Sequence, Union

import torch
from torch import nn

from dropbp.gate import DropBPGate, find_gates, no_gates_message

SAMPLING_MODES = ("bernoulli", "fixed")
# keep probabilities are quantised to this many units for fixed-budget sampling, so sums are exact integers
_UNITS = 1_000_000


def check_rate(rate: float, name: str = "drop rate") -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")
    return rate


class DropBPHandler:
    """Finds every gate of ``model`` and decides, before each micro-batch's forward, which ones are dropped.

    Args:
        model: any ``nn.Module`` containing :class:`DropBPGate` modules.
        rate: a uniform drop rate, or one rate per gate (in :func:`find_gates` order).
        sampling: ``"bernoulli"`` draws each branch independently (the paper). ``"fixed"`` keeps the same number
            of branches of each kind (attention, MLP) every step, using systematic sampling in a random order, so
            that each branch is still kept with probability exactly ``1 - p_i`` while step time and peak memory do
            not vary. The kept count of a kind is ``sum(1 - p_i)`` when that is an integer, else its floor or ceil.
        seed: seeds the handler's own generator. The global RNG is never used, so data order and dropout are
            unaffected, and handlers built with the same seed on every rank draw the same masks.
    """

    def __init__(
        self,
        model: nn.Module,
        rate: Union[float, Sequence[float]] = 0.0,
        sampling: str = "bernoulli",
        seed: int = 0,
    ) -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {sampling!r}; choose one of {', '.join(SAMPLING_MODES)}")
        self.gates: list = find_gates(model)
        if not self.gates:
            raise ValueError(no_gates_message(model, "DropBP"))
        self.sampling = sampling
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.allocated = False
        self.rates = torch.zeros(len(self.gates), dtype=torch.float64)
        self.set_rates(rate)
        self.mask = torch.zeros(len(self.gates), dtype=torch.bool)

    # ----------------------------------------------------------------------------------------------- rates
    @property
    def flops(self) -> torch.Tensor:
        return torch.tensor([g.flops for g in self.gates], dtype=torch.float64)

    def set_flops(self, flops: Sequence[float]) -> None:
        if len(flops) != len(self.gates):
            raise ValueError(f"got {len(flops)} FLOPs values for {len(self.gates)} gates")
        for gate, f in zip(self.gates, flops):
            gate.flops = float(f)

    def set_rates(self, rate: Union[float, Sequence[float]]) -> None:
        if isinstance(rate, (int, float)):
            rates = [check_rate(rate)] * len(self.gates)
        else:
            rates = [check_rate(r, f"drop rate of gate {i}") for i, r in enumerate(rate)]
            if len(rates) != len(self.gates):
                raise ValueError(f"got {len(rates)} drop rates for {len(self.gates)} gates")
        self.rates = torch.tensor(rates, dtype=torch.float64)

    @property
    def mean_rate(self) -> float:
        """Target drop rate, weighted by branch FLOPs (what the backward saving is proportional to)."""
        flops = self.flops
        return float((self.rates * flops).sum() / flops.sum())

    @property
    def realised_rate(self) -> float:
        """FLOPs-weighted fraction of branches dropped in the current mask (from the gates' Python state: no tensor
        is read, so a training loop may call it every micro-batch)."""
        total = sum(g.flops for g in self.gates)
        return sum(g.flops for g in self.gates if g.dropped) / total

    # ----------------------------------------------------------------------------------------------- masks
    def sample(self) -> torch.Tensor:
        """Draw the mask for the next micro-batch (True = dropped) and set it on the gates. Call before forward."""
        if self.sampling == "bernoulli":
            mask = torch.rand(len(self.gates), generator=self.generator, dtype=torch.float64) < self.rates
        else:
            mask = torch.zeros(len(self.gates), dtype=torch.bool)
            for kind in sorted({g.kind for g in self.gates}):
                idx = torch.tensor([i for i, g in enumerate(self.gates) if g.kind == kind])
                mask[idx] = ~self._systematic_keep(1.0 - self.rates[idx])
        self.set_mask(mask)
        return mask

    def _systematic_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Systematic sampling: item j is kept iff a point of {u, u+1, u+2, ...} falls in its cumulative interval.
        Exact marginals keep[j], and the kept count is the sum of keep (floor or ceil when not an integer)."""
        order = torch.randperm(len(keep), generator=self.generator)
        units = torch.round(keep[order] * _UNITS).long()
        upper = torch.cumsum(units, 0)
        lower = upper - units
        u = int(torch.randint(_UNITS, (1,), generator=self.generator))
        hits = torch.div(upper - u + _UNITS - 1, _UNITS, rounding_mode="floor") - torch.div(
            lower - u + _UNITS - 1, _UNITS, rounding_mode="floor"
        )
        kept = torch.zeros(len(keep), dtype=torch.bool)
        kept[order] = hits > 0
        return kept

    def set_mask(self, mask: torch.Tensor) -> None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (len(self.gates),):
            raise ValueError(f"mask must have shape ({len(self.gates)},), got {tuple(mask.shape)}")
        self.mask = mask.clone()
        for gate, dropped in zip(self.gates, mask.tolist()):
            gate.dropped = dropped

    def touch_dropped(self, enabled: bool) -> None:
        """Make dropped and skipped branches give their trainable weights a zero gradient in this micro-batch's
        backward (``DropBPGate.touch``): for the micro-batch in which a data-parallel wrapper reduces gradients."""
        for gate in self.gates:
            gate.touch = enabled

    def keep_all(self) -> None:
        """Back-propagate through every branch (evaluation, sensitivity reference, or p = 0)."""
        self.set_mask(torch.zeros(len(self.gates), dtype=torch.bool))

    @property
    def kept(self) -> torch.Tensor:
        """The branches this micro-batch back-propagates through (neither dropped nor skipped), one bool per gate."""
        return torch.tensor([not (g.dropped or g.skipped) for g in self.gates], dtype=torch.bool)

    @property
    def all_dropped(self) -> bool:
        """True when no gate needs backward. Skip backward only if nothing outside the blocks is trainable."""
        return bool(self.mask.all())

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "rates": self.rates.tolist(),
            "sampling": self.sampling,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "allocated": self.allocated,
            "mask": self.mask.tolist(),
            "flops": self.flops.tolist(),  # the branch weights the rates were allocated against
        }

    def load_state_dict(self, state: dict) -> None:
        self.set_rates(state["rates"])
        if state["sampling"] not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {state['sampling']!r} in DropBP state")
        self.sampling = state["sampling"]
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.allocated = bool(state["allocated"])
        self.set_mask(torch.tensor(state["mask"], dtype=torch.bool))
        if "flops" in state:  # absent in states saved before the FLOPs were recorded
            self.set_flops(state["flops"])


def gate_of_parameters(handler: DropBPHandler) -> dict:
    """Map id(parameter) -> index of the single gate whose branch contains it (shared parameters are left out)."""
    owners: dict = {}
    for i, gate in enumerate(handler.gates):
        for p in gate.branch_parameters():
            owners.setdefault(id(p), set()).add(i)
    return {pid: next(iter(gates)) for pid, gates in owners.items() if len(gates) == 1}


def clear_dropped_gradients(handler: DropBPHandler, kept: torch.Tensor) -> None:
    """Set back to None the gradients of the weights whose branches were dropped in every micro-batch of a step.

    ``kept`` is the OR of the step's ``handler.kept`` masks. On several ranks the step's reducing backward touches the
    dropped branches' trainable weights (``handler.touch_dropped``), so those weights hold a reduced zero gradient
    (FSDP also gives zeros to the rest of a unit); on one device they hold None. Call this after the reduction and
    before the optimizer step, so the optimizer leaves them (weight decay, momentum, Adam state) alone, as on one
    device. Weights shared with a kept branch keep their gradient."""
    kept = kept.tolist()
    live = {id(p) for gate, k in zip(handler.gates, kept) if k for p in gate.branch_parameters()}
    for gate, k in zip(handler.gates, kept):
        if not k:
            for p in gate.branch_parameters():
                if id(p) not in live:
                    p.grad = None


__all__ = [
    "DropBPGate", "DropBPHandler", "SAMPLING_MODES", "check_rate", "clear_dropped_gradients", "gate_of_parameters",
]
