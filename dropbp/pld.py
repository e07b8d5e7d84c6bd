"""Progressive Layer Dropping (Zhang & He, 2020), the paper's baseline, on the same gates as DropBP.

Schedule (DeepSpeed's form): keep ratio theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar, where t counts
optimizer steps from 0 (every micro-batch of a step uses the same theta). Block l of L (1-based) is kept with
probability 1 - (l / L) * (1 - theta(t)); a dropped block skips its branches in forward and backward, and a kept
block's branch outputs are scaled by 1 / keep probability.

What is dropped, in FLOPs. PLD skips forward and backward of a dropped block, and every transformer block costs
the same, so the expected fraction of the blocks' FLOPs saved at step t is the mean drop probability over the
blocks, (1 - theta(t)) * (L + 1) / (2 L) (just over half the last block's drop rate 1 - theta(t)).

Which gamma. The paper compares "PLD 0 -> 0.5" (the drop rate 1 - theta goes from 0 to 1 - theta_bar = 0.5)
against DropBP at a uniform 0.5, and states that both cut the FLOPs per iteration by 25% (section 3.1, Table 2:
"-25%"). At theta_bar = 0.5 the steady state saves 0.5 * (L + 1) / (2 L) = 25.8% for L = 32, so the paper's
25% is the saving once the ramp is over, and it describes the whole run only when the ramp is a small part of
the run (PLD's setting: BERT pre-training, far longer than the ramp). DeepSpeed's gamma = 0.001 per optimizer
step ramps over ~1000 steps, while the paper's recipes run 390 (Alpaca) or 109 (Dolly) optimizer steps: PLD
would then drop 4.4% / 1.3% of the FLOPs on average, nowhere near the FLOPs it is compared at.
So by default (``gamma=None`` or ``"auto"``) gamma is derived from the run length: it is solved so that the mean
over the run's steps t = 0 .. total_steps - 1 of the expected dropped fraction equals ``target_drop`` (0.25, the
saving the paper matches with DropBP at 0.5). The drop rate still rises from 0 at step 0 to 1 - theta_bar; for
L = 32 it rises within the first few percent of the run (gamma ~ 0.088 at 390 steps, ~ 0.36 at 109), since the
steady state is only 3% above the target. A number for ``gamma`` overrides this (DeepSpeed's 0.001 is still
available); when the target cannot be reached (steady state below it, or a run so short that step 0, which drops
nothing, weighs too much) the schedule goes to theta_bar from step 1 on and a warning says so.
"""

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from dropbp.gate import find_gates, no_gates_message

AUTO = "auto"


def steady_drop(theta_bar: float, num_layers: int) -> float:
    """Expected fraction of blocks (= of their FLOPs) dropped at keep ratio theta_bar: (1 - theta_bar)(L+1)/(2L)."""
    return (1.0 - theta_bar) * (num_layers + 1) / (2 * num_layers)


def run_mean_drop(theta_bar: float, gamma: float, num_layers: int, total_steps: int) -> float:
    """Mean over steps t = 0 .. total_steps - 1 of the expected dropped fraction under the schedule."""
    if gamma == 0:
        return 0.0
    # sum_t exp(-gamma t) in closed form, (1 - e^(-gamma T)) / (1 - e^(-gamma)); gamma = inf leaves only t = 0
    decayed = math.expm1(-gamma * total_steps) / math.expm1(-gamma)
    return steady_drop(theta_bar, num_layers) * (1.0 - decayed / total_steps)


def solve_gamma(theta_bar: float, num_layers: int, total_steps: int, target_drop: float = 0.25) -> float:
    """The gamma whose run of ``total_steps`` optimizer steps drops ``target_drop`` of the blocks on average.
    Returns ``math.inf`` (theta_bar from step 1 on), with a warning, when no finite gamma reaches the target."""
    if not 0.0 < target_drop < 1.0:
        raise ValueError(f"pld target_drop must be in (0, 1), got {target_drop}")
    if not total_steps or not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(f"an automatic pld gamma needs the run's number of optimizer steps, got {total_steps}")
    total_steps = int(total_steps)
    best = run_mean_drop(theta_bar, math.inf, num_layers, total_steps)
    if target_drop >= best:
        warnings.warn(
            f"PLD: a run of {total_steps} optimizer steps with theta_bar={theta_bar} and {num_layers} layers drops at"
            f" most {best:.1%} of the blocks on average, below the target {target_drop:.1%}: theta_bar from step 1"
            f" on (gamma = inf). Lower --pld.theta_bar or --pld.target_drop, or set --pld.gamma"
        )
        return math.inf
    lo, hi = 0.0, 1.0
    while run_mean_drop(theta_bar, hi, num_layers, total_steps) < target_drop:
        hi *= 2.0
    for _ in range(200):  # the mean drop increases with gamma: bisect
        mid = 0.5 * (lo + hi)
        if run_mean_drop(theta_bar, mid, num_layers, total_steps) < target_drop:
            lo = mid
        else:
            hi = mid
    return hi


class PLDHandler:
    """Samples which blocks PLD skips.

    Args:
        model: a model with :class:`DropBPGate` modules (``gate.layer`` gives the block).
        theta_bar: final keep ratio of the last block (1 - theta_bar is the "0.5" of "PLD 0 -> 0.5").
        gamma: decay of the keep ratio per optimizer step, or ``None`` / ``"auto"`` to solve it from
            ``total_steps`` and ``target_drop`` (see the module docstring).
        seed: seeds the handler's own generator (never the global RNG).
        total_steps: optimizer steps of the run; needed only by an automatic gamma.
        target_drop: mean fraction of the blocks' FLOPs dropped over the run that an automatic gamma aims at.
    """

    def __init__(
        self,
        model: nn.Module,
        theta_bar: float = 0.5,
        gamma: Union[float, str, None] = None,
        seed: int = 0,
        total_steps: Optional[float] = None,
        target_drop: float = 0.25,
    ) -> None:
        if not 0.0 < theta_bar <= 1.0:
            raise ValueError(f"pld theta_bar must be in (0, 1], got {theta_bar}")
        self.auto = gamma is None or gamma == AUTO
        if not self.auto and (isinstance(gamma, str) or gamma < 0):
            raise ValueError(f"pld gamma must be >= 0, None or 'auto', got {gamma!r}")
        self.gates = find_gates(model)
        if not self.gates:
            raise ValueError(no_gates_message(model, "PLD"))
        self.layers = sorted({g.layer for g in self.gates})
        self.theta_bar, self.total_steps, self.target_drop = theta_bar, total_steps, target_drop
        self.gamma = solve_gamma(theta_bar, len(self.layers), total_steps, target_drop) if self.auto else float(gamma)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def theta(self, step: int) -> float:
        decay = math.exp(-self.gamma * step) if step > 0 else 1.0  # step 0 keeps everything, also at gamma = inf
        return (1.0 - self.theta_bar) * decay + self.theta_bar

    def keep_probabilities(self, step: int) -> list:
        drop = 1.0 - self.theta(step)
        n = len(self.layers)
        return [1.0 - (rank + 1) / n * drop for rank in range(n)]

    def expected_drop(self, step: int) -> float:
        """Expected fraction of the blocks (= of their FLOPs) skipped at ``step``."""
        return 1.0 - sum(self.keep_probabilities(step)) / len(self.layers)

    def mean_expected_drop(self, total_steps: Optional[int] = None) -> float:
        """Mean of :meth:`expected_drop` over steps 0 .. total_steps - 1 (default: the run's)."""
        total_steps = int(total_steps or self.total_steps)
        return run_mean_drop(self.theta_bar, self.gamma, len(self.layers), total_steps)

    def sample(self, step: int) -> list:
        """Decide, for optimizer step ``step``, which blocks run; returns the kept flag of each layer."""
        self.step = step
        keep_p = self.keep_probabilities(step)
        draws = torch.rand(len(self.layers), generator=self.generator, dtype=torch.float64).tolist()
        kept = {layer: u < p for layer, u, p in zip(self.layers, draws, keep_p)}
        scale = dict(zip(self.layers, keep_p))
        for gate in self.gates:
            gate.dropped = False
            gate.skipped = not kept[gate.layer]
            gate.scale = 1.0 / scale[gate.layer]
        return [kept[layer] for layer in self.layers]

    def disable(self) -> None:
        """Run every block unscaled (evaluation and inference: PLD's expected output is the full model's)."""
        for gate in self.gates:
            gate.skipped, gate.scale = False, 1.0

    @property
    def skipped_fraction(self) -> float:
        return sum(g.skipped for g in self.gates) / len(self.gates)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "step": self.step, "gamma": self.gamma,
                "theta_bar": self.theta_bar, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator and step; an automatic gamma also takes the saved run's gamma, so that a resumed
        run continues the same schedule (an explicit ``gamma`` given at resume wins). Older states lack it."""
        self.generator.set_state(state["generator"])
        self.step = state["step"]
        if self.auto and state.get("gamma") is not None:
            self.gamma = float(state["gamma"])
