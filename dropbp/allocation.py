"""Sensitivity-based drop-rate allocation: a convex variant of the paper's Eq. 6, not Eq. 6 itself, solved greedily
in steps of 0.1 as in its sec. 3.2. The paper's objective is linear in the rates, and its published code raises
the branch with the least S_i * (p_i + 0.1); this module's cost is S_i * p_i / (1 - p_i) (why, below).

Cost of a drop rate. S_i is how much the gradient changes when branch i is dropped (Alg. 1). A branch dropped with
probability p contributes its gradient path on a fraction 1 - p of the steps: a signal g kept with probability
1 - p has variance p (1 - p) g^2 around a mean (1 - p) g, a relative variance p / (1 - p) whatever the learning
rate does with the scale (1/(1 - p) compensation or not, Adam's normalisation). So the cost of rate p is

    cost_i(p) = S_i * p / (1 - p)

which is ~ S_i * p at small rates but grows without bound towards p = 1: each further step on an already highly
dropped branch costs more than the last (convex). We solve

    minimise  sum_i S_i * p_i / (1 - p_i)
    s.t.      sum_i (1 - p_i) * F_i  <=  (1 - p_target) * sum_i F_i,
              p_i on the grid min_rate, min_rate + step, ..., capped at max_rate.

The paper prints the objective as ``min sum (1 - p_i) S_i``; read literally, that drops the most sensitive branches
first, the opposite of its text ("the least increase in expected sensitivity") and of its Fig. 8. Its intent is
the expected gradient perturbation, increasing in p_i. A linear form, sum p_i S_i (what this module used before),
is what that intent gives at small rates, but with a linear cost and a linear budget the optimum is a vertex:
every branch at min_rate or max_rate but one (all-or-nothing; 60 of LLaMA2-7B's 64 branches at 0.9 for a 0.875
target), equal sensitivities are split by FLOPs alone, and the result jumps with noise in S. It is gone. The convex
cost gives graded rates, lower where S is high (the first and last layers, as in the paper's Fig. 6a and 8), and
near-uniform rates when the sensitivities are equal.

Greedy: start every branch at ``min_rate`` and repeatedly raise by one ``step`` (the last one cut at ``max_rate``)
the branch whose next step adds the least cost per FLOP saved, ``(cost_i(p + step) - cost_i(p)) / (step * F_i)``,
until the budget is met. Ties go to the lowest current rate, then the lowest index, so the result is deterministic.
The last step may overshoot the target by less than one step of one branch.

Optimality. The cost is separable and convex, so each branch's successive steps cost non-decreasing amounts per
FLOP (secant slopes of a convex function grow), and the greedy takes steps in non-decreasing order of that price;
with lambda the price of its last step, every step taken costs <= lambda per FLOP and every step not taken
>= lambda. Any grid allocation x is a per-branch prefix of steps too, so against the greedy result g,
cost(x) - cost(g) >= lambda * (saved(x) - saved(g)): g has the least cost among all grid allocations that save at
least as many FLOPs (keep at most as many) as g does. Against the budget-exact optimum it is worse by at most its
last step's cost (g without that step is optimal for the FLOPs it saves, which fall short of the budget).
"""

import heapq
from typing import Sequence

import torch


def _cost(s: float, p: float) -> float:
    return s * p / (1.0 - p)


def allocate_rates(
    sensitivity: Sequence[float],
    flops: Sequence[float],
    target: float,
    step: float = 0.1,
    max_rate: float = 0.9,
    min_rate: float = 0.0,
) -> list:
    """Per-branch drop rates whose FLOPs-weighted mean meets ``target`` at the least total cost
    ``sum_i S_i p_i / (1 - p_i)`` (see the module docstring), on the grid ``min_rate + k * step`` capped at
    ``max_rate``. Returns one rate per branch, rounded to 10 decimals."""
    s = torch.as_tensor(sensitivity, dtype=torch.float64)
    f = torch.as_tensor(flops, dtype=torch.float64)
    if s.shape != f.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError("sensitivity and flops must be two non-empty lists of the same length")
    if bool((f <= 0).any()) or not bool(torch.isfinite(f).all()) or bool((s < 0).any()) or not bool(
        torch.isfinite(s).all()
    ):
        raise ValueError("flops must be positive and finite, and sensitivities finite and non-negative")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"allocation step must be in (0, 1], got {step}")
    if not 0.0 <= min_rate <= max_rate < 1.0:
        raise ValueError(f"need 0 <= min_rate <= max_rate < 1, got min_rate={min_rate}, max_rate={max_rate}")
    if not min_rate <= target <= max_rate:
        raise ValueError(
            f"target drop rate {target} cannot be met with rates in [min_rate={min_rate}, max_rate={max_rate}]"
        )

    sens, fl = s.tolist(), f.tolist()
    total = sum(fl)
    steps = [0] * len(sens)  # rate of branch i: min(min_rate + steps[i] * step, max_rate)

    def rate(k: int) -> float:
        return round(min(min_rate + k * step, max_rate), 10)

    def price(i: int) -> float:  # added cost per FLOP saved by branch i's next step
        p, q = rate(steps[i]), rate(steps[i] + 1)
        return (_cost(sens[i], q) - _cost(sens[i], p)) / ((q - p) * fl[i])

    budget = (1.0 - target) * total
    kept = (1.0 - min_rate) * total
    tolerance = 1e-9 * total
    heap = [(price(i), min_rate, i) for i in range(len(sens)) if rate(0) < max_rate]
    heapq.heapify(heap)
    while kept > budget + tolerance:
        # the target is at most max_rate, so the queue cannot run dry before the budget is met
        _, p, i = heapq.heappop(heap)
        steps[i] += 1
        q = rate(steps[i])
        kept -= (q - p) * fl[i]
        if q < max_rate:
            heapq.heappush(heap, (price(i), q, i))
    return [rate(k) for k in steps]
