"""DropBP for Hugging Face Transformers models (and PEFT) and the ``transformers.Trainer``.

The same core as the litgpt models: a :class:`dropbp.DropBPGate` on every residual branch, a
:class:`dropbp.DropBPHandler` that draws the mask before each micro-batch, :func:`dropbp.compute_sensitivity` and
:func:`dropbp.allocate_rates`. Only this module imports ``transformers`` (the ``hf`` extra: ``pip install -e ".[hf]"``).

- :func:`install_gates` turns every decoder layer of a supported model (LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma 2,
  Gemma 3, Phi-3) into a gated subclass of its own class: the layer's ``__class__`` is swapped for a subclass whose
  ``forward`` calls the attention and the MLP branch through a gate each. No parameter or buffer is added, so the
  state-dict keys (and ``save_pretrained``) are unchanged; with no branch dropped the layer runs its own ``forward``.
  The gated forward re-implements the layer's forward, so before a class is gated its installed ``forward`` is
  checked, statement by statement, against the layout this module implements: a Transformers release that changes
  a layer's forward gets a clear error instead of a silently different model.
- :class:`DropBPCallback` (a ``TrainerCallback``): a fresh mask before every micro-batch (``on_step_begin`` before the
  first micro-batch of an optimizer step, ``on_substep_end`` before each further one under gradient accumulation),
  the sensitivity pass and re-allocation at ``sensitivity_at`` of the run on a fixed probe batch, the realised drop
  rate as ``drop_rate`` in the Trainer's logs, and the handler's state in every Trainer checkpoint.
- :func:`build_gated_llama`: a random-init Transformers LLaMA of given dimensions (optionally with PEFT LoRA), gated,
  with its handler: what a benchmark needs.
"""

import ast
import base64
import inspect
import json
import logging
import os
import textwrap
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from transformers import TrainerCallback

from dropbp.allocation import allocate_rates
from dropbp.flops import attention_flops, mlp_flops
from dropbp.gate import DropBPGate
from dropbp.handler import DropBPHandler, check_rate
from dropbp.sensitivity import METRICS, compute_sensitivity

logger = logging.getLogger(__name__)

ATTN_GATE = "dropbp_attn_gate"
MLP_GATE = "dropbp_mlp_gate"
STATE_KEY = "dropbp"  # key of the handler's state in a checkpoint's trainer_state.json ("stateful_callbacks")


# ------------------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    """Where a decoder layer's two residual branches start and end.

    attention branch: ``attn_post(self_attn(attn_norm(h))[0])``, added to ``h`` (residual first);
    MLP branch:       ``mlp_post(mlp(mlp_norm(h)))``, added to ``h``. ``attn_post``/``mlp_post`` may be ``None``.
    ``template``: the layer's own forward body, as the installed class must read (``{call}`` is the attention call's
    arguments, generated from the forward's signature).
    """

    attn_norm: str
    attn_post: Optional[str]
    mlp_norm: str
    mlp_post: Optional[str]
    template: str


LAYOUTS = {
    # LLaMA, Mistral, Qwen2, Qwen3, Gemma: x = x + attn(norm(x)); x = x + mlp(norm(x))
    "pre_norm": Layout(
        "input_layernorm", None, "post_attention_layernorm", None,
        """
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn({call})
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
        """,
    ),
    # Gemma 2, Gemma 3: each branch also has a norm on its output (inside the residual branch)
    "sandwich": Layout(
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        """
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn({call})
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
        """,
    ),
    # Phi-3 (fused qkv and gate-up projections live inside self_attn and mlp): residual dropout on each branch
    "phi3": Layout(
        "input_layernorm", "resid_attn_dropout", "post_attention_layernorm", "resid_mlp_dropout",
        """
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn({call})
        hidden_states = residual + self.resid_attn_dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + self.resid_mlp_dropout(hidden_states)
        return hidden_states
        """,
    ),
}

# decoder-layer classes (module.qualname of the class that defines ``forward``) -> layout; tested in tests/test_hf.py
SUPPORTED = {
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": "pre_norm",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer": "pre_norm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer": "pre_norm",
    "transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer": "pre_norm",
    "transformers.models.gemma.modeling_gemma.GemmaDecoderLayer": "pre_norm",
    "transformers.models.gemma2.modeling_gemma2.Gemma2DecoderLayer": "sandwich",
    "transformers.models.gemma3.modeling_gemma3.Gemma3DecoderLayer": "sandwich",
    "transformers.models.phi3.modeling_phi3.Phi3DecoderLayer": "phi3",
}


def register_decoder_layer(cls: type, layout: str) -> None:
    """Declare that ``cls`` (a decoder-layer class) has one of the :data:`LAYOUTS`. Its forward is still checked
    against the layout's template when gates are installed. FLOPs weights assume a dense attention and a gated
    (3-matrix) MLP; pass other weights with ``handler.set_flops``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    SUPPORTED[_qualified(_forward_owner(cls))] = layout


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _forward_owner(cls: type) -> type:
    """The class in ``cls``'s MRO whose own ``forward`` ``cls`` runs (a subclass that does not override forward
    runs its base's)."""
    return next(c for c in cls.__mro__ if "forward" in c.__dict__)


def _layer_signature(cls: type) -> tuple:
    """The forward's named parameters after ``hidden_states`` (names, defaults), its signature and the name of its
    ``**kwargs``."""
    sig = inspect.signature(cls.forward)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    if names[:2] != ["self", "hidden_states"] or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{_qualified(cls)}.forward{sig} is not forward(self, hidden_states, ..., **kwargs)")
    named = [p for p in params[2:-1]]
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.default is p.empty for p in named):
        raise TypeError(f"{_qualified(cls)}.forward{sig}: every argument after hidden_states needs a default")
    return tuple(p.name for p in named), {p.name: p.default for p in named}, sig, params[-1].name


def _normalised_body(func: Callable) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    stmts = tree.body[0].body
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant):
        stmts = stmts[1:]  # docstring
    for s in stmts:  # `hidden_states, attn_weights = self.self_attn(...)`: the discarded name does not matter
        if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Tuple) and len(s.targets[0].elts) == 2:
            if isinstance(s.targets[0].elts[1], ast.Name):
                s.targets[0].elts[1].id = "_"
    return "\n".join(ast.unparse(s) for s in stmts)


_CHECKED: dict = {}


def layout_of(cls: type) -> Layout:
    """The layout of decoder-layer class ``cls``; ``TypeError`` naming the class if it is not supported or its
    installed forward is not the one the gated forward re-implements."""
    owner = _forward_owner(cls)
    name = _qualified(owner)
    if name not in SUPPORTED:
        raise TypeError(
            f"DropBP has no gated forward for {_qualified(cls)} (forward of {name}). Supported decoder layers: "
            + ", ".join(n.rsplit(".", 1)[1] for n in SUPPORTED)
            + " (dropbp.integrations.transformers.register_decoder_layer declares another class with one of"
            f" the layouts {', '.join(LAYOUTS)})"
        )
    layout = LAYOUTS[SUPPORTED[name]]
    if (owner, layout) not in _CHECKED:
        params, _, _, varkw = _layer_signature(owner)
        call = ", ".join(["hidden_states=hidden_states"] + [f"{p}={p}" for p in params] + [f"**{varkw}"])
        expected = "\n".join(ast.unparse(s) for s in ast.parse(textwrap.dedent(layout.template).format(call=call)).body)
        try:
            actual = _normalised_body(owner.forward)
        except (OSError, TypeError):  # no source file: cannot verify
            warnings.warn(f"cannot read the source of {name}.forward: assuming the {SUPPORTED[name]!r} layout")
            actual = expected
        if actual != expected:
            raise TypeError(
                f"{name}.forward in transformers {_transformers_version()} is not the {SUPPORTED[name]!r} layout that"
                f" DropBP's gated forward re-implements (tested with transformers 5.3.0); expected:\n{expected}\n"
                f"found:\n{actual}"
            )
        _CHECKED[(owner, layout)] = True
    return layout


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ---------------------------------------------------------------------------------------------- gated layer
class GatedDecoderLayer:
    """Mixin placed before a Transformers decoder-layer class; :func:`install_gates` turns built layers into it."""

    _dropbp_layout: Layout
    _dropbp_params: tuple
    _dropbp_defaults: dict
    _dropbp_signature: inspect.Signature
    _dropbp_varkw: str
    _dropbp_base: type

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        modules = self._modules
        attn_gate, mlp_gate = modules[ATTN_GATE], modules[MLP_GATE]
        if attn_gate.passthrough and mlp_gate.passthrough:
            # no gate changes anything (p = 0, or both kept): the layer's own forward, exactly its ops
            return super().forward(*args, **kwargs)
        hidden_states, attn_kwargs = self._dropbp_arguments(args, kwargs)
        residual = hidden_states
        out = attn_gate(self._dropbp_attention, hidden_states, attn_kwargs)
        hidden_states = residual if out is None else residual + out  # the layer's order: residual first
        residual = hidden_states
        out = mlp_gate(self._dropbp_mlp, hidden_states)
        return residual if out is None else residual + out

    def _dropbp_arguments(self, args: tuple, kwargs: dict) -> tuple:
        """hidden_states, and the keyword arguments the layer's own forward passes to ``self_attn``: each named
        parameter (its default when not given) and the rest of ``**kwargs``."""
        if len(args) == 1 and "hidden_states" not in kwargs:  # how the models call their layers
            return args[0], {**self._dropbp_defaults, **kwargs}
        bound = self._dropbp_signature.bind(self, *args, **kwargs)
        given = bound.arguments
        attn_kwargs = {name: given.get(name, self._dropbp_defaults[name]) for name in self._dropbp_params}
        attn_kwargs.update(given.get(self._dropbp_varkw, {}))
        return given["hidden_states"], attn_kwargs

    def _dropbp_attention(self, hidden_states: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        modules, layout = self._modules, self._dropbp_layout
        hidden_states = modules[layout.attn_norm](hidden_states)
        hidden_states = modules["self_attn"](hidden_states=hidden_states, **attn_kwargs)[0]
        return hidden_states if layout.attn_post is None else modules[layout.attn_post](hidden_states)

    def _dropbp_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        modules, layout = self._modules, self._dropbp_layout
        hidden_states = modules["mlp"](modules[layout.mlp_norm](hidden_states))
        return hidden_states if layout.mlp_post is None else modules[layout.mlp_post](hidden_states)


_GATED_CLASSES: dict = {}


def gated_class(cls: type) -> type:
    """The gated subclass of decoder-layer class ``cls`` (one per class). It keeps ``cls.__name__``, so name-based
    look-ups (``_no_split_modules``, FSDP's ``transformer_layer_cls_to_wrap``) still find it."""
    layout = layout_of(cls)
    if (cls, layout) not in _GATED_CLASSES:
        params, defaults, sig, varkw = _layer_signature(_forward_owner(cls))
        _GATED_CLASSES[(cls, layout)] = type(
            cls.__name__,
            (GatedDecoderLayer, cls),
            {
                "__module__": __name__,
                "__qualname__": f"Gated{cls.__qualname__}",
                "_dropbp_layout": layout,
                "_dropbp_params": params,
                "_dropbp_defaults": defaults,
                "_dropbp_signature": sig,
                "_dropbp_varkw": varkw,
                "_dropbp_base": cls,
            },
        )
    return _GATED_CLASSES[(cls, layout)]


def _is_decoder_layer(module: nn.Module) -> bool:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer) or type(module).__name__.endswith("DecoderLayer")


def decoder_layers(model: nn.Module) -> list:
    """Every decoder layer of ``model`` (a Transformers model, a PEFT model around one, or any module holding one),
    in module order."""
    return [m for m in model.modules() if _is_decoder_layer(m)]


def install_gates(model: nn.Module, seq_len: Optional[int] = None) -> list:
    """Put a :class:`dropbp.DropBPGate` on the attention and the MLP branch of every decoder layer of ``model``
    and return the gates (block 0 attention, block 0 MLP, block 1 attention, ...).

    Works on a plain Transformers model or a PEFT model, before or after ``get_peft_model`` (the gates hold the
    branch's modules, so LoRA layers added later inside them count as the branch's parameters). ``seq_len``: the
    training sequence length the branches' FLOPs are weighed at (default: the config's ``max_position_embeddings``;
    :class:`DropBPCallback` re-weighs at the probe batch's length before it allocates rates).

    Raises ``TypeError`` naming the class for a decoder layer this module cannot gate, and ``ValueError`` when the
    model already has gates or has no decoder layer.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"found no decoder layer in {type(model).__name__}: nothing to gate")
    if any(isinstance(layer, GatedDecoderLayer) for layer in layers):
        raise ValueError(f"{type(model).__name__} already has DropBP gates")
    classes = [gated_class(type(layer)) for layer in layers]  # every class is checked before any layer changes
    gates = []
    for idx, (layer, cls) in enumerate(zip(layers, classes)):
        layout = cls._dropbp_layout
        modules = layer._modules
        index = getattr(layer.self_attn, "layer_idx", None)
        index = idx if index is None else index
        attn_branch = [modules[n] for n in (layout.attn_norm, "self_attn", layout.attn_post) if n is not None]
        mlp_branch = [modules[n] for n in (layout.mlp_norm, "mlp", layout.mlp_post) if n is not None]
        layer.__class__ = cls
        # no parameters or buffers: the state-dict keys stay those of the model
        setattr(layer, ATTN_GATE, DropBPGate("attn", index, 1.0, attn_branch))
        setattr(layer, MLP_GATE, DropBPGate("mlp", index, 1.0, mlp_branch))
        gates += [getattr(layer, ATTN_GATE), getattr(layer, MLP_GATE)]
    set_gate_flops(model, seq_len)
    return gates


def remove_gates(model: nn.Module) -> nn.Module:
    """Undo :func:`install_gates`: every gated layer gets its own class back and loses its gates."""
    for layer in decoder_layers(model):
        if isinstance(layer, GatedDecoderLayer):
            del layer._modules[ATTN_GATE], layer._modules[MLP_GATE]
            layer.__class__ = type(layer)._dropbp_base
    return model


# --------------------------------------------------------------------------------------------------- FLOPs
def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_dims(config) -> SimpleNamespace:
    """A Transformers config's dimensions under the names :mod:`dropbp.flops` reads (litgpt's), so both frameworks
    weigh their branches with the same formulas."""
    c = _text_config(config)
    heads = c.num_attention_heads
    return SimpleNamespace(
        n_embd=c.hidden_size,
        n_head=heads,
        n_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        head_size=getattr(c, "head_dim", None) or c.hidden_size // heads,
        intermediate_size=c.intermediate_size,
        mlp_class_name="LLaMAMLP",  # every supported family has a gated MLP: 3 matrices
        latent_attention=None,
    )


def set_gate_flops(model: nn.Module, seq_len: Optional[int] = None) -> None:
    """Weigh each gate by its branch's forward FLOPs at ``seq_len`` (the attention term grows as s^2); ``None``:
    the config's ``max_position_embeddings``."""
    for layer in decoder_layers(model):
        if not isinstance(layer, GatedDecoderLayer):
            continue
        config = getattr(layer.self_attn, "config", None) or getattr(layer, "config", None)
        if config is None:
            raise TypeError(f"{type(layer).__name__}: no config found on the layer or its self_attn")
        s = seq_len or _text_config(config).max_position_embeddings
        dims = config_dims(config)
        getattr(layer, ATTN_GATE).flops = attention_flops(dims, s)
        getattr(layer, MLP_GATE).flops = mlp_flops(dims, s)


# ------------------------------------------------------------------------------------------ handler state
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
    ``<output_dir>/dropbp_allocation.json``. Single process only is tested (masks are seeded, so ranks would agree).
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
        self._hook = None
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
        self._window[0] += self.handler.realised_rate
        self._window[1] += 1

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
        if getattr(args, "world_size", 1) > 1:
            warnings.warn("DropBPCallback is tested on a single process; multi-process training is untested")
        if self._hook is None:
            self._hook = model.register_forward_hook(self._anchor)
        self._window = [0.0, 0]
        self._record(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.sample()  # the first micro-batch of the step

    def on_substep_end(self, args, state, control, **kwargs):
        self.sample()  # every further micro-batch of the step (gradient accumulation)

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
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.handler.keep_all()  # inference after training takes every layer's own forward

    # ------------------------------------------------------------------------------------------- allocation
    def allocate(self, args=None, state=None) -> list:
        """The sensitivity pass on the probe batch, then the re-allocation of the rates (also callable by hand).
        Accumulated gradients, RNG states, train/eval modes and the optimizer are untouched."""
        model = self._model
        if model is None or self.probe_batch is None:
            raise RuntimeError("allocate() runs during training (after on_train_begin), with a probe batch")
        t0 = time.perf_counter()
        trainable = [p for p in model.parameters() if p.requires_grad]
        metric = self.metric
        if metric == "auto":
            total = sum(p.numel() for p in model.parameters())
            metric = "gradnorm" if sum(p.numel() for p in trainable) > total / 2 else "grad"
        sensitivity = compute_sensitivity(
            self.handler, model, lambda: self.loss_fn(model, self.probe_batch), metric=metric
        )
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


# --------------------------------------------------------------------------------------------- benchmark
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    seq_len: int,
    n_query_groups: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    **overrides: Any,
):
    """A ``LlamaConfig`` of the shape ``scripts/benchmark.py`` gives litgpt (LLaMA-2 style: RMSNorm eps 1e-5, no
    bias, untied head, intermediate size 8/3 of the width rounded down to 64, at least 64), sdpa attention."""
    from transformers import LlamaConfig

    kwargs = dict(
        num_hidden_layers=n_layer,
        hidden_size=n_embd,
        num_attention_heads=n_head,
        num_key_value_heads=n_query_groups or n_head,
        intermediate_size=intermediate_size or max(64, int(n_embd * 8 / 3) // 64 * 64),
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = overrides.get("attn_implementation", "sdpa")
    return config


def build_gated_llama(
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    seq_len: int,
    method: str = "full",
    rate: Union[float, Sequence[float]] = 0.0,
    sampling: str = "fixed",
    seed: int = 0,
    init_seed: int = 0,
    n_query_groups: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    gated: bool = True,
) -> tuple:
    """A random-init Transformers ``LlamaForCausalLM`` of the given dimensions and its DropBP handler.

    ``method``: ``"full"`` (every parameter trains) or ``"lora"`` (PEFT LoRA, rank ``lora_r``, alpha ``lora_alpha``,
    no dropout, on q, k, v, o and the three MLP projections: the litgpt benchmark's LoRA layout; the result is the
    ``PeftModel``). Gates are installed with FLOPs at ``seq_len``. ``gated=False`` returns the unpatched model and
    ``None`` (the side-by-side baseline). The weights depend only on ``init_seed``, so the gated and unpatched models
    built with the same arguments are identical. Call ``model(input_ids=x, labels=y).loss``; call
    ``handler.sample()`` before each forward.
    """
    from transformers import LlamaForCausalLM

    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', got {method!r}")
    config = llama_config(n_layer, n_embd, n_head, vocab_size, seq_len, n_query_groups, intermediate_size)
    device = torch.device(device)
    rng_devices = [] if device.type != "cuda" else [device.index or 0]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target precision and on the target device, as the litgpt rows
    try:
        with torch.random.fork_rng(devices=rng_devices), device:
            torch.manual_seed(init_seed)
            model = LlamaForCausalLM(config)
            if method == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
                model = get_peft_model(model, lora)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to(device=device, dtype=dtype)
    model.train()
    if not gated:
        return model, None
    install_gates(model, seq_len=seq_len)
    return model, DropBPHandler(model, rate=rate, sampling=sampling, seed=seed)


__all__ = [
    "ATTN_GATE",
    "DropBPCallback",
    "GatedDecoderLayer",
    "LAYOUTS",
    "Layout",
    "MLP_GATE",
    "SUPPORTED",
    "build_gated_llama",
    "config_dims",
    "decoder_layers",
    "default_loss",
    "gated_class",
    "install_gates",
    "layout_of",
    "llama_config",
    "register_decoder_layer",
    "remove_gates",
    "set_gate_flops",
]
