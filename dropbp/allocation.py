"""Sensitivity-based drop-rate allocation (the paper's Eq. 6, solved greedily as in its section 4.1).

Objective. Dropping branch i with probability p_i perturbs the gradient by about S_i each time it happens, so the
expected perturbation is sum_i p_i * S_i. We minimise it under the FLOPs target of the paper:

    minimise  sum_i p_i * S_i
    s.t.      sum_i (1 - p_i) * F_i  <=  (1 - p_target) * sum_i F_i,     p_i in {min_rate, min_rate + step, ...} <= max_rate

(The paper prints the objective as sum (1 - p_i) S_i; read literally that would drop the most sensitive branches
first, the opposite of its text and of its Fig. 8, so we use the expected-perturbation form above.)

Greedy: start every branch at ``min_rate`` and repeatedly raise by one ``step`` the branch with the least added
sensitivity per FLOP saved (S_i / F_i), until the budget is met. Ties go to the branch with the lowest current rate,
so branches of equal sensitivity share the drop evenly (all-equal S gives the uniform allocation). The last step
may overshoot the target by less than one step of one branch.
"""

import heapq
from typing import Sequence

import torch


def allocate_rates(
    sensitivity: Sequence[float],
    flops: Sequence[float],
    target: float,
    step: float = 0.1,
    max_rate: float = 0.9,
    min_rate: float = 0.0,
) -> list:
    """Per-branch drop rates meeting the FLOPs-weighted ``target`` average at the least expected sensitivity."""
    s = torch.as_tensor(sensitivity, dtype=torch.float64)
    f = torch.as_tensor(flops, dtype=torch.float64)
    if s.shape != f.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError("sensitivity and flops must be two non-empty lists of the same length")
    if bool((f <= 0).any()) or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("flops must be positive and sensitivities finite and non-negative")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"allocation step must be in (0, 1], got {step}")
    if not 0.0 <= min_rate <= max_rate < 1.0:
        raise ValueError(f"need 0 <= min_rate <= max_rate < 1, got min_rate={min_rate}, max_rate={max_rate}")
    if not min_rate <= target <= max_rate:
        raise ValueError(
            f"target drop rate {target} cannot be met with rates in [min_rate={min_rate}, max_rate={max_rate}]"
        )

    rates = [min_rate] * len(s)
    budget = (1.0 - target) * float(f.sum())
    kept_flops = (1.0 - min_rate) * float(f.sum())
    tolerance = 1e-9 * float(f.sum())
    heap = [(float(s[i] / f[i]), min_rate, i) for i in range(len(s)) if min_rate < max_rate]
    heapq.heapify(heap)
    while kept_flops > budget + tolerance:
        # the target is at most max_rate, so the queue cannot run dry before the budget is met
        _, _, i = heapq.heappop(heap)
        new_rate = min(rates[i] + step, max_rate)
        kept_flops -= (new_rate - rates[i]) * float(f[i])
        rates[i] = round(new_rate, 10)
        if rates[i] < max_rate:
            heapq.heappush(heap, (float(s[i] / f[i]), rates[i], i))
    return rates
