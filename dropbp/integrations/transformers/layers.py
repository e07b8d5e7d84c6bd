"""The gated decoder layer: a subclass of a Transformers decoder-layer class whose ``forward`` calls the attention and
the MLP branch through a :class:`dropbp.DropBPGate` each; installing and removing gates; FLOPs weights."""

import inspect
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from dropbp.flops import attention_flops, mlp_flops
from dropbp.gate import DropBPGate
from dropbp.integrations.transformers.layout import Layout, _forward_owner, _layer_signature, layout_of

ATTN_GATE = "dropbp_attn_gate"
MLP_GATE = "dropbp_mlp_gate"


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

    def __reduce_ex__(self, protocol: int):
        # the generated class is not reachable by name: pickle (and deepcopy) record the layer's own class and
        # rebuild the gated subclass of it on load
        return _new_gated_layer, (self._dropbp_base,), self.__getstate__()

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


def _new_gated_layer(base: type) -> nn.Module:
    """An empty instance of the gated subclass of ``base`` for pickle to fill (see ``GatedDecoderLayer.__reduce_ex__``)."""
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
