"""Which Transformers decoder layers DropBP can gate, and the check that a layer's installed ``forward`` is the one the
gated forward re-implements (a Transformers release that changes it gets a clear error, not a different model)."""

import ast
import inspect
import textwrap
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

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
                f" DropBP's gated forward re-implements (supported: transformers{TRANSFORMERS_VERSIONS});"
                f" expected:\n{expected}\n"
                f"found:\n{actual}"
            )
        _CHECKED[(owner, layout)] = True
    return layout


# the releases this package supports: pyproject.toml's hf extra says the same (a test checks); `make test` runs the
# integration's tests with the oldest (constraints.txt) and with the newest release the package index serves
TRANSFORMERS_VERSIONS = ">=5.3.0,<6"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str) -> None:
    """``ImportError`` in one line when ``version`` is outside :data:`TRANSFORMERS_VERSIONS`."""
    from packaging.specifiers import SpecifierSet

    if version not in SpecifierSet(TRANSFORMERS_VERSIONS, prereleases=True):
        raise ImportError(
            f"dropbp.integrations.transformers supports transformers{TRANSFORMERS_VERSIONS}, found {version}:"
            f" pip install 'transformers{TRANSFORMERS_VERSIONS}'"
        )
