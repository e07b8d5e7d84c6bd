"""DropBP for the ``transformers.Trainer``: :class:`DropBPCallback` draws the masks, runs the sensitivity pass and
keeps the handler's state in the Trainer's checkpoints."""

import base64
import hashlib
import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

from dropbp.allocation import allocate_rates
from dropbp.handler import DropBPHandler, check_rate, clear_dropped_gradients
from dropbp.integrations.transformers.layers import set_gate_flops
from dropbp.sensitivity import METRICS, compute_sensitivity

logger = logging.getLogger(__name__)

STATE_KEY = "dropbp"  # key of the handler's state in a checkpoint's trainer_state.json ("stateful_callbacks")


def encode_state(state: dict) -> dict:
    """A handler's ``state_dict()`` as JSON-serialisable values (the generator state as base64)."""
    out = dict(state)
    out["generator"] = base64.b64encode(state["generator"].numpy().tobytes()).decode("ascii")
    return out


def decode_state(state: dict) -> dict:
    out = dict(state)
    raw = bytearray(base64.b64decode(state["generator"]))
    out["generator"] = torch.frombuffer(raw, dtype=torch.uint8).clone()
    return out


# ------------------------------------------------------------------------------------------- several processes
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def _backward_reduces() -> bool:
    """Whether the backward of the forward now running may reduce gradients over the ranks. False only when that
    forward is DDP's and DDP will not reduce (inside ``no_sync``: the Trainer's accumulating micro-batches); True
    otherwise (DDP reducing, or a wrapper this cannot see into), so that touching is never missing where it is
    needed. DDP records the module whose forward is running (``_get_active_ddp_module``, kept for TorchDynamo)."""
    active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    ddp = active() if active is not None else None
    return ddp is None or bool(getattr(ddp, "require_backward_grad_sync", True))


def _handler_digest(handler: DropBPHandler) -> str:
    """What decides the next masks: the rates, the sampling mode and the generator's state."""
    h = hashlib.sha256(json.dumps([handler.rates.tolist(), handler.sampling, handler.mask.tolist()]).encode())
    h.update(handler.generator.get_state().numpy().tobytes())
    return h.hexdigest()


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (a picklable object); ``value`` itself on one process."""
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------- Trainer
def _loss_of(output) -> torch.Tensor:
    if isinstance(output, dict):
        return output["loss"]
    return output[0]


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The probe loss: what the model returns for a batch with labels (as ``Trainer.compute_loss`` uses it)."""
    loss = _loss_of(model(**batch))
    if loss is None:
        raise ValueError("the model returned no loss for the probe batch: it needs labels (or pass loss_fn)")
    return loss


class DropBPCallback(TrainerCallback):
    """DropBP for ``transformers.Trainer``: ``Trainer(..., callbacks=[DropBPCallback(handler)])``.

    Why a callback is enough. The Trainer calls ``on_step_begin`` before the first micro-batch of each optimizer
    step and ``on_substep_end`` after every other micro-batch's backward, so sampling in both gives each micro-batch
    its own mask, drawn before its forward (and therefore the same when gradient checkpointing recomputes the
    forward during backward). When the sampled mask keeps no branch that holds a trainable parameter (LoRA on some
    layers only), the model's loss has no graph and ``Trainer.training_step`` would fail in
    ``accelerator.backward``: a forward hook on the trained model then adds a zero that requires grad to the loss
    (or to the logits, when the Trainer computes the loss itself), so ``backward`` runs through that addition
    only: no parameter gets a gradient and the optimizer leaves them all alone that micro-batch.

    Several processes (``torchrun``/``accelerate launch``, DDP). Every rank draws the same masks: the handler's
    generator is its own and seeded (``on_train_begin`` checks that the ranks' handlers agree, and the sensitivity
    pass's rates are rank 0's on every rank). DDP reduces gradients once per optimizer step, in the backward of the
    step's last micro-batch, and expects every trainable parameter it holds to take part in that backward (with
    ``find_unused_parameters=False``, what the Trainer builds with gradient checkpointing, a parameter that does not
    breaks the reduction). So in a micro-batch whose backward reduces, dropped branches touch their trainable weights
    (``handler.touch_dropped``: a zero term, the forward's value unchanged): a forward pre-hook on the model asks DDP
    whether this forward's backward reduces, and touches only then (always, under a wrapper other than DDP). After the
    reduction, ``on_pre_optimizer_step`` sets back to None the gradients of the weights dropped in every micro-batch
    of the step (:func:`dropbp.handler.clear_dropped_gradients`), so the optimizer leaves them and their state alone,
    as on one process. The Trainer calls it after gradient clipping: those gradients are exact zeros on every rank
    then, which add nothing to the clipped norm and stay zero when scaled, so norm and update equal one process's.
    Tested with DDP (``find_unused_parameters`` False and True) on CPU; FSDP and DeepSpeed under the Trainer are not.

    Args:
        handler: the :class:`dropbp.DropBPHandler` over the gated model (its rates are the target until the
            sensitivity pass).
        sensitivity_at: fraction of the run's optimizer steps after which the sensitivity pass runs and the rates
            are re-allocated (the paper: 0.1). Only with ``allocation="sensitivity"`` and a target rate above 0.
        allocation: ``"sensitivity"`` (the paper's Alg. 1 and allocation) or ``"uniform"`` (keep the rates).
        target_rate: the FLOPs-weighted mean drop rate the allocation must meet; default: the handler's mean rate.
        metric: ``"grad"``, ``"gradnorm"`` or ``"auto"`` (``gradnorm`` when most parameters train, as in full
            fine-tuning, where keeping a copy of every gradient would cost a model's worth of memory).
        probe_batch: the fixed batch of the sensitivity pass (a dict of tensors with labels); default:
            ``probe_batch_size`` training samples (default: the per-device batch size) picked with ``probe_seed``
            from the training set and collated by the training data loader's collator, apart from the training
            order.
        loss_fn: ``loss_fn(model, batch) -> loss`` for the probe; default: the model's own loss.
        step, max_rate, min_rate: the allocation grid (see :func:`dropbp.allocate_rates`).
        seq_len: weigh branch FLOPs at this sequence length; default: the probe batch's length at allocation.

    The handler's state (rates, generator, mask) is written into each checkpoint's ``trainer_state.json`` (under
    ``stateful_callbacks["dropbp"]``) and restored from it by ``trainer.train(resume_from_checkpoint=...)``, so a
    resumed run draws the same masks as an uninterrupted one. The allocation is also written to
    ``<output_dir>/dropbp_allocation.json``.
    """

    def __init__(
        self,
        handler: DropBPHandler,
        sensitivity_at: float = 0.1,
        allocation: str = "sensitivity",
        target_rate: Optional[float] = None,
        metric: str = "auto",
        probe_batch: Optional[dict] = None,
        probe_batch_size: Optional[int] = None,
        probe_seed: int = 1234,
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
        step: float = 0.1,
        max_rate: float = 0.9,
        min_rate: float = 0.0,
        seq_len: Optional[int] = None,
    ) -> None:
        if allocation not in ("sensitivity", "uniform"):
            raise ValueError(f"allocation must be 'sensitivity' or 'uniform', got {allocation!r}")
        if metric != "auto" and metric not in METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; choose auto or one of {', '.join(METRICS)}")
        if not 0.0 <= sensitivity_at < 1.0:
            raise ValueError(f"sensitivity_at must be in [0, 1), got {sensitivity_at}")
        self.handler = handler
        self.sensitivity_at = sensitivity_at
        self.allocation = allocation
        self.target_rate = None if target_rate is None else check_rate(target_rate, "target drop rate")
        self.metric = metric
        self.probe_batch = probe_batch
        self.probe_batch_size = probe_batch_size
        self.probe_seed = probe_seed
        self.loss_fn = loss_fn
        self.step, self.max_rate, self.min_rate = step, max_rate, min_rate
        self.seq_len = seq_len
        self.report: Optional[dict] = None  # the allocation: per-branch sensitivity and rate
        self._model: Optional[nn.Module] = None
        self._hooks: list = []
        self._touching = False  # several processes: dropped branches touch their weights where the backward reduces
        self._kept = torch.zeros(len(handler.gates), dtype=torch.bool)  # branches kept in this optimizer step
        self._allocate_at: Optional[int] = None
        self._window = [0.0, 0]  # sum of realised drop rates, micro-batches since the last log

    # ---------------------------------------------------------------------------------------------- helpers
    def attach(self, trainer) -> "DropBPCallback":
        """Add this callback to ``trainer`` as its first callback, so that reporting integrations (TensorBoard,
        W&B), which the Trainer puts before user callbacks, also see ``drop_rate``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    @property
    def needs_allocation(self) -> bool:
        return self.allocation == "sensitivity" and (self.target_rate or 0.0) > 0.0 and not self.handler.allocated

    def sample(self) -> None:
        """Draw the next micro-batch's mask (the callback calls it; a custom loop may too)."""
        self.handler.sample()
        self._kept |= self.handler.kept
        self._window[0] += self.handler.realised_rate
        self._window[1] += 1

    def _touch(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook (several processes): dropped branches touch their weights iff this backward reduces."""
        if self._touching:
            self.handler.touch_dropped(module.training and torch.is_grad_enabled() and _backward_reduces())

    def _anchor(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: give a graph-less loss (nothing trainable kept) a zero that requires grad."""
        if not (module.training and torch.is_grad_enabled() and bool(self.handler.mask.any())):
            return None

        def anchored(t):
            zero = torch.zeros((), dtype=t.dtype, device=t.device, requires_grad=True)
            return t + zero

        if isinstance(output, dict):
            for key in ("loss", "logits"):
                t = output.get(key)
                if isinstance(t, torch.Tensor):
                    if t.is_floating_point() and not t.requires_grad:
                        output[key] = anchored(t)
                    return output
            return None
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            t = output[0]
            if t.is_floating_point() and not t.requires_grad:
                return (anchored(t),) + output[1:]
        return None

    def _probe(self, args, train_dataloader, device) -> dict:
        if self.probe_batch is not None:
            batch = self.probe_batch
        else:
            if train_dataloader is None:
                raise ValueError("no training data loader to draw the probe batch from: pass probe_batch")
            dataset = train_dataloader.dataset
            try:
                n = len(dataset)
            except TypeError:
                raise ValueError("the training set has no length (an IterableDataset): pass probe_batch") from None
            size = min(n, self.probe_batch_size or args.per_device_train_batch_size)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.probe_seed)).tolist()[:size]
            batch = train_dataloader.collate_fn([dataset[i] for i in order])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}

    def _record(self, state) -> None:
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = {
            "handler": encode_state(self.handler.state_dict()),
            "target_rate": self.target_rate,
            "report": self.report,
        }

    # ----------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("DropBPCallback needs the Trainer's model")
        self._model = model
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None:  # resuming: the masks continue where the checkpoint left off
            self.handler.load_state_dict(decode_state(saved["handler"]))
            self.target_rate = saved.get("target_rate", self.target_rate)
            self.report = saved.get("report")
        elif state.global_step > 0:
            warnings.warn(
                f"resuming at step {state.global_step} from a checkpoint without DropBP state: the drop masks and"
                " rates start afresh"
            )
        if self.target_rate is None:
            self.target_rate = self.handler.mean_rate
        if self.needs_allocation and not self.min_rate <= self.target_rate <= self.max_rate:
            raise ValueError(
                f"target drop rate {self.target_rate} is outside [min_rate={self.min_rate}, max_rate={self.max_rate}]"
            )
        self._allocate_at = max(1, int(self.sensitivity_at * state.max_steps)) if state.max_steps > 0 else None
        if self.needs_allocation and self.probe_batch is None:
            device = next(model.parameters()).device
            self.probe_batch = self._probe(args, train_dataloader, device)  # fail early, not at 10% of the run
        self._touching = getattr(args, "world_size", 1) > 1
        if self._touching:
            self._check_ranks_agree()
        if not self._hooks:
            self._hooks = [model.register_forward_pre_hook(self._touch), model.register_forward_hook(self._anchor)]
        self._window = [0.0, 0]
        self._kept.zero_()
        self._record(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._kept.zero_()
        self.sample()  # the first micro-batch of the step

    def on_substep_end(self, args, state, control, **kwargs):
        self.sample()  # every further micro-batch of the step (gradient accumulation)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # after the step's reduction (and after clipping: see the class docstring), before optimizer.step()
        if self._touching:
            clear_dropped_gradients(self.handler, self._kept)

    def on_step_end(self, args, state, control, **kwargs):
        if self.needs_allocation and self._allocate_at is not None and state.global_step >= self._allocate_at:
            self.allocate(args, state)
        self._record(state)  # before the Trainer saves a checkpoint of this step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._window[1] == 0:
            return
        drop_rate = self._window[0] / self._window[1]
        logs["drop_rate"] = drop_rate
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last["drop_rate"] = drop_rate  # the Trainer appended a copy of logs before calling on_log
        self._window = [0.0, 0]

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._touching = False
        self.handler.touch_dropped(False)
        self.handler.keep_all()  # inference after training takes every layer's own forward

    def _check_ranks_agree(self) -> None:
        """Several processes: the ranks' handlers must draw the same masks (same seed, rates and generator state)."""
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            raise RuntimeError(
                "DropBPCallback on several processes needs the Trainer's on_pre_optimizer_step event (a newer"
                " transformers release): without it, weights dropped in a whole step would be updated with zero"
                " gradients"
            )
        if not _distributed():
            return
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, _handler_digest(self.handler))
        if len(set(digests)) > 1:
            raise ValueError(
                "the DropBP handlers differ across ranks, so their drop masks would too: build the handler with the"
                " same seed and rates on every rank"
            )

    # ------------------------------------------------------------------------------------------- allocation
    def allocate(self, args=None, state=None) -> list:
        """The sensitivity pass on the probe batch, then the re-allocation of the rates (also callable by hand; on
        several processes by every rank: rank 0's rates are broadcast). Accumulated gradients, RNG states, train/eval
        modes and the optimizer are untouched."""
        model = self._model
        if model is None or self.probe_batch is None:
            raise RuntimeError("allocate() runs during training (after on_train_begin), with a probe batch")
        t0 = time.perf_counter()
        trainable = [p for p in model.parameters() if p.requires_grad]
        metric = self.metric
        if metric == "auto":
            total = sum(p.numel() for p in model.parameters())
            metric = "gradnorm" if sum(p.numel() for p in trainable) > total / 2 else "grad"
        touching, self._touching = self._touching, False  # the probes run on the unwrapped model: nothing reduces
        self.handler.touch_dropped(False)
        try:
            sensitivity = compute_sensitivity(
                self.handler, model, lambda: self.loss_fn(model, self.probe_batch), metric=metric
            )
        finally:
            self._touching = touching
        if not torch.isfinite(sensitivity).all():
            raise RuntimeError("non-finite sensitivity in the DropBP probe pass (the probe loss or gradients diverged)")
        input_ids = self.probe_batch.get("input_ids")
        seq_len = self.seq_len or (input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else None)
        if seq_len:
            set_gate_flops(model, seq_len)
        rates = allocate_rates(
            sensitivity.tolist(), self.handler.flops.tolist(), self.target_rate, self.step, self.max_rate,
            self.min_rate,
        )
        # every rank probed the same batch; rank 0's rates on every rank keep the masks equal even where the
        # sensitivities differ in the last bits (nondeterministic GPU kernels)
        rates = _from_rank0(rates)
        self.handler.set_rates(rates)
        self.handler.allocated = True
        seconds = time.perf_counter() - t0
        self.report = {
            "step": None if state is None else state.global_step,
            "metric": metric,
            "target_rate": self.target_rate,
            "mean_rate": self.handler.mean_rate,
            "seconds": seconds,
            "branches": [
                {"layer": g.layer, "kind": g.kind, "flops": g.flops, "sensitivity": s, "rate": r}
                for g, s, r in zip(self.handler.gates, sensitivity.tolist(), rates)
            ],
        }
        logger.info(
            "DropBP sensitivity pass (%s, %d branches, %.1fs): FLOPs-weighted mean drop rate %.3f (target %s)",
            metric, len(rates), seconds, self.handler.mean_rate, self.target_rate,
        )
        if args is not None and getattr(args, "should_save", True) and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "dropbp_allocation.json"), "w") as f:
                json.dump(self.report, f, indent=2)
        return rates
