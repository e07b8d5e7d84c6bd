"""DropBP: drop backward propagation through randomly chosen residual branches, keeping the forward exact.

Model-agnostic (torch only): put a :class:`DropBPGate` around each residual branch, build a
:class:`DropBPHandler` over the model, and call ``handler.sample()`` before each micro-batch.
"""

from dropbp.allocation import allocate_rates
from dropbp.flops import branch_flops
from dropbp.gate import DropBPGate, add_branch, find_gates
from dropbp.handler import SAMPLING_MODES, DropBPHandler, check_rate
from dropbp.pld import PLDHandler
from dropbp.sensitivity import METRICS, compute_sensitivity

__all__ = [
    "DropBPGate",
    "DropBPHandler",
    "PLDHandler",
    "METRICS",
    "SAMPLING_MODES",
    "add_branch",
    "allocate_rates",
    "branch_flops",
    "check_rate",
    "compute_sensitivity",
    "find_gates",
]
