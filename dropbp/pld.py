"""Progressive Layer Dropping (Zhang & He, 2020), the paper's baseline, on the same gates as DropBP.

Keep ratio theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar at optimizer step t (DeepSpeed's schedule and
defaults). Block l of L (1-based) is kept with probability 1 - (l / L) * (1 - theta(t)); a dropped block skips
its branches in forward and backward, and a kept block's branch outputs are scaled by 1 / keep probability.
"""

import math

import torch
from torch import nn

from dropbp.gate import find_gates


class PLDHandler:
    def __init__(self, model: nn.Module, theta_bar: float = 0.5, gamma: float = 0.001, seed: int = 0) -> None:
        if not 0.0 < theta_bar <= 1.0:
            raise ValueError(f"pld theta_bar must be in (0, 1], got {theta_bar}")
        if gamma < 0:
            raise ValueError(f"pld gamma must be >= 0, got {gamma}")
        self.gates = find_gates(model)
        if not self.gates:
            raise ValueError("the model has no DropBPGate: build it from lit_gpt before using PLD")
        self.layers = sorted({g.layer for g in self.gates})
        self.theta_bar, self.gamma = theta_bar, gamma
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def theta(self, step: int) -> float:
        return (1.0 - self.theta_bar) * math.exp(-self.gamma * step) + self.theta_bar

    def keep_probabilities(self, step: int) -> list:
        drop = 1.0 - self.theta(step)
        n = len(self.layers)
        return [1.0 - (rank + 1) / n * drop for rank in range(n)]

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
        return {"generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.step = state["step"]
