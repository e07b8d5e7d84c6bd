"""Sensitivity of each branch (the paper's Algorithm 1), computed without disturbing training.

S_i measures how much dropping only branch i changes the parameter gradients of one probe batch:
- ``"grad"``:     S_i = sum over tensors ||G0 - Gi||^2         (gradient variance; stores one copy of the grads)
- ``"gradnorm"``: S_i = sum over tensors (||G0|| - ||Gi||)^2   (gradnorm variance; stores two norms per tensor,
  the memory-light form for full fine-tuning)
A gradient that is missing (its parameters live only inside the dropped branch) counts as zeros.
"""

import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from dropbp.handler import DropBPHandler

METRICS = ("grad", "gradnorm")


@contextmanager
def preserved_training_state(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> Iterator[Callable[[], None]]:
    """Set aside accumulated gradients, RNG states and train/eval modes; restore them exactly on exit.

    Yields ``reset_rng``, which puts every RNG back to its state at entry: calling it before each probe makes all
    probes see the same dropout masks, so their gradients differ only by the dropped branch.
    """
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    try:
        import numpy as np

        np_rng = np.random.get_state()
    except ImportError:  # numpy is optional for the core
        np, np_rng = None, None

    def reset_rng() -> None:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np is not None:
            np.random.set_state(np_rng)

    for p in params:
        p.grad = None
    try:
        yield reset_rng
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        for m, training in modes:
            m.training = training
        reset_rng()


def compute_sensitivity(
    handler: DropBPHandler,
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    metric: str = "grad",
    backward: Optional[Callable[[torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Return S (one value per gate, float64) for the probe batch that ``loss_fn`` evaluates.

    ``loss_fn`` runs the forward pass on the probe batch (of any size) and returns a scalar loss; ``backward``
    defaults to ``loss.backward()`` (pass ``fabric.backward`` under mixed precision). Accumulated ``.grad``,
    RNG states, train/eval modes and the handler's mask and generator are the same before and after the call.
    The optimizer is never touched.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; choose one of {', '.join(METRICS)}")
    backward = backward or (lambda loss: loss.backward())
    params = [p for p in model.parameters() if p.requires_grad]
    saved_mask = handler.mask.clone()

    def probe(reset_rng: Callable[[], None]) -> list:
        reset_rng()
        backward(loss_fn())
        grads = []
        for p in params:
            # kept as a copy: a data-parallel wrapper may let .grad be a view of its own buffer (DDP's
            # gradient_as_bucket_view), which the next probe overwrites
            g = None if p.grad is None else p.grad.detach()
            grads.append(None if g is None else g.double().norm() if metric == "gradnorm" else g.clone())
            p.grad = None
        return grads

    def distance(ref: list, grads: list) -> float:
        total = 0.0
        for r, g in zip(ref, grads):
            if r is None and g is None:
                continue
            if r is None:
                r = torch.zeros_like(g)
            if g is None:
                g = torch.zeros_like(r)
            total += float(((r.double() - g.double()) ** 2).sum())
        return total

    sensitivity = torch.zeros(len(handler.gates), dtype=torch.float64)
    try:
        with preserved_training_state(model, params) as reset_rng:
            handler.keep_all()
            reference = probe(reset_rng)
            for i in range(len(handler.gates)):
                only_i = torch.zeros(len(handler.gates), dtype=torch.bool)
                only_i[i] = True
                handler.set_mask(only_i)
                sensitivity[i] = distance(reference, probe(reset_rng))
    finally:
        handler.set_mask(saved_mask)
    return sensitivity
