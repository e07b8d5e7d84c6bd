"""The gated decoder layer: a subclass of a Transformers decoder-layer class whose ``forward`` calls the attention and
the MLP branch through a :class:`dropbp.DropBPGate` each; installing and removing gates; FLOPs weights."""

import inspect
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from dropbp.compile import compile_branch_functions, outside_dynamo, run_eager
from dropbp.flops import attention_flops, mlp_flops
from dropbp.gate import DropBPGate
from dropbp.integrations.transformers.layout import Layout, _forward_owner, _layer_signature, layout_of

ATTN_GATE = "dropbp_attn_gate"
MLP_GATE = "dropbp_mlp_gate"


def attention_branch(layer: nn.Module, hidden_states: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    """A gated layer's attention residual branch: ``attn_post(self_attn(attn_norm(h))[0])``. A function of the
    layer, not a method, so that one compiled function serves every layer (the modules are Dynamo inputs, not
    constants: no recompile per layer)."""
    modules, layout = layer._modules, layer._dropbp_layout
    hidden_states = modules[layout.attn_norm](hidden_states)
    hidden_states = modules["self_attn"](hidden_states=hidden_states, **attn_kwargs)[0]
    return hidden_states if layout.attn_post is None else modules[layout.attn_post](hidden_states)


def mlp_branch(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A gated layer's MLP residual branch: ``mlp_post(mlp(mlp_norm(h)))``."""
    modules, layout = layer._modules, layer._dropbp_layout
    hidden_states = modules["mlp"](modules[layout.mlp_norm](hidden_states))
    return hidden_states if layout.mlp_post is None else modules[layout.mlp_post](hidden_states)


# DropBPGate.forward, run in Python when called from the gated forward under torch.compile of the whole model: its
# frame (the gate's state) is not traced, the branch function it calls is (a gate has no hooks: no nn.Module.__call__)
_gate_forward = outside_dynamo(DropBPGate.forward)


# what a decoder layer's KV cache argument is called: `past_key_values` (transformers 5.3), `cache` (5.25)
CACHE_ARGUMENTS = ("past_key_values", "cache")


class GatedDecoderLayer:
    """Mixin placed before a Transformers decoder-layer class; :func:`install_gates` turns built layers into it."""

    _dropbp_layout: Layout
    _dropbp_params: tuple
    _dropbp_defaults: dict
    _dropbp_signature: inspect.Signature
    _dropbp_varkw: str
    _dropbp_base: type

    _dropbp_branches: Optional[tuple] = None  # (attention, mlp) in place of the eager functions: compile_branches

    @outside_dynamo
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Under torch.compile of the whole model this frame runs in Python, so the gates' state never becomes a Dynamo
        # guard, and Dynamo compiles the frames it calls: the branch functions, or the layer's own forward.
        modules = self._modules
        attn_gate, mlp_gate = modules[ATTN_GATE], modules[MLP_GATE]
        branches = self._dropbp_branches
        # A KV cache (generation, or training with use_cache=True): its per-layer state would be a guard of the
        # compiled branch (a graph per layer, then the recompile limit), so the layer runs eager, as litgpt's do.
        eager = any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS)
        if (branches is None or eager) and attn_gate.passthrough and mlp_gate.passthrough:
            # no gate changes anything (p = 0, or both kept): the layer's own forward, exactly its ops
            if eager:
                return run_eager(super().forward, *args, **kwargs)
            return super().forward(*args, **kwargs)
        attention, mlp = (attention_branch, mlp_branch) if eager or branches is None else branches
        hidden_states, attn_kwargs = self._dropbp_arguments(args, kwargs)
        residual = hidden_states
        gate = run_eager if eager else _gate_forward  # the gate's own forward, out of Dynamo too
        out = gate(attn_gate, attention, self, hidden_states, attn_kwargs)
        hidden_states = residual if out is None else residual + out  # the layer's order: residual first
        residual = hidden_states
        out = gate(mlp_gate, mlp, self, hidden_states)
        return residual if out is None else residual + out

    def __reduce_ex__(self, protocol: int):
        # the generated class is not reachable by name: pickle (and deepcopy) record the layer's own class and
        # rebuild the gated subclass of it on load. Compiled branches do not pickle: a copy runs the eager ones.
        state = {k: v for k, v in self.__getstate__().items() if k != "_dropbp_branches"}
        return _new_gated_layer, (self._dropbp_base,), state

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


def _new_gated_layer(base: type) -> nn.Module:
    """An empty instance of the gated subclass of ``base`` for pickle to fill
    (see ``GatedDecoderLayer.__reduce_ex__``)."""
    cls = gated_class(base)
    return cls.__new__(cls)


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
            layer.__dict__.pop("_dropbp_branches", None)
            layer.__class__ = type(layer)._dropbp_base
    return model


def compile_branches(model: nn.Module, **compile_options) -> nn.Module:
    """``torch.compile`` the attention and the MLP branch functions that every gated layer of ``model`` calls
    through its gates (``compile_options``: those of ``torch.compile``; default ``dynamic=True``), and return
    ``model``. The gates decide in Python, outside the compiled code (a dropped branch is called under
    ``no_grad``), so a branch needs a graph per grad mode and per whether its input requires grad (with LoRA, not
    before the first kept branch with a trainable parameter), shared by every layer of a kind: never one per drop
    mask. The layers always run their branches through the gates (at p = 0 too, compiled); embedding, head and loss
    stay eager. The Dynamo settings of :data:`dropbp.compile.BRANCH_DYNAMO_CONFIG` hold only inside the compiled
    branches. ``torch.compile(model)`` of a gated model also works (the gated forward is kept out of Dynamo: see
    ``GatedDecoderLayer.forward``); this helper is the lighter route. A copy or pickle of the model runs the eager
    branches: compile it again.
    """
    layers = [m for m in decoder_layers(model) if isinstance(m, GatedDecoderLayer)]
    if not layers:
        raise ValueError(f"compile_branches: {type(model).__name__} has no gated decoder layer (install_gates first)")
    branches = compile_branch_functions((attention_branch, mlp_branch), **compile_options)
    for layer in layers:
        layer._dropbp_branches = branches
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
