"""The ``--dropbp.*`` and ``--pld.*`` argument groups shared by every recipe."""

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class DropBPArgs:
    """DropBP: drop backward propagation through residual branches"""

    rate: float = 0.0
    """Target average drop rate (FLOPs-weighted), in [0, 1). 0 trains exactly like plain litgpt"""
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"
    """Keep the uniform rate, or re-allocate per-branch rates by sensitivity at ``sensitivity_at``"""
    sensitivity_at: float = 0.1
    """Fraction of the optimizer steps after which the sensitivity pass runs"""
    sensitivity: Literal["grad", "gradnorm", "auto"] = "auto"
    """Sensitivity metric; auto: gradnorm for full fine-tuning (memory-light), grad otherwise"""
    probe_batch_size: Optional[int] = None
    """Samples in the sensitivity probe batch (default: the micro-batch size)"""
    sampling: Literal["bernoulli", "fixed"] = "bernoulli"
    """bernoulli: independent draws (the paper); fixed: same kept count per step (steady time and memory)"""
    max_rate: float = 0.9
    """Highest drop rate the allocation may give a branch"""
    min_rate: float = 0.0
    """Lowest drop rate the allocation may give a branch"""
    step: float = 0.1
    """Granularity of the allocated rates"""
    lr_compensation: bool = False
    """Scale each branch's lr by 1/P(updated in a step): 1/(1 - p_i^accum) for AdamW-type optimizers,
    1/(1 - p_i) for SGD"""
    seed: Optional[int] = None
    """Seed of the drop decisions (default: the run's seed). Independent of the data and dropout RNG"""


@dataclass
class PLDArgs:
    """Progressive Layer Dropping baseline (Zhang & He 2020), DeepSpeed's schedule scaled to the run's length"""

    enabled: bool = False
    theta_bar: float = 0.5
    """Final keep ratio of the last block (the paper's "PLD 0 -> 0.5" is 1 - theta_bar)"""
    gamma: Optional[float] = None
    """Decay of the keep ratio per optimizer step. None: solved from the run's steps so that it drops
    ``target_drop`` of the blocks' FLOPs on average (DeepSpeed's 0.001 needs far longer runs than these recipes)"""
    target_drop: float = 0.25
    """Mean fraction of the blocks' FLOPs dropped over the run when gamma is None (the paper's match with DropBP 0.5)"""
    with_dropbp: bool = False
    """Allow PLD and DropBP together (refused unless set)"""
