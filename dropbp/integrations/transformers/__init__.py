"""DropBP for Hugging Face Transformers models (and PEFT) and the ``transformers.Trainer``.

The same core as the litgpt models: a :class:`dropbp.DropBPGate` on every residual branch, a
:class:`dropbp.DropBPHandler` that draws the mask before each micro-batch, :func:`dropbp.compute_sensitivity` and
:func:`dropbp.allocate_rates`. Only this package imports ``transformers`` (``pip install "dropbp[hf]"``).

- :func:`install_gates` (``layers.py``) turns every decoder layer of a supported model (LLaMA, Mistral, Qwen2, Qwen3,
  Gemma, Gemma 2, Gemma 3, Phi-3) into a gated subclass of its own class: the layer's ``__class__`` is swapped for a
  subclass whose ``forward`` calls the attention and the MLP branch through a gate each. No parameter or buffer is
  added, so the state-dict keys (and ``save_pretrained``) are unchanged; with no branch dropped the layer runs its
  own ``forward``. A gated model pickles, deep-copies and saves with ``torch.save``; :func:`remove_gates` restores
  the original classes.
- The gated forward re-implements the layer's forward, so before a class is gated its installed ``forward`` is
  checked, statement by statement, against the layout this package implements (``layout.py``): a Transformers
  release that changes a layer's forward gets a clear error instead of a silently different model.
- ``torch.compile``: :func:`compile_branches` compiles only the attention and MLP branch functions (shared by every
  layer: a graph per grad mode and input-requires-grad, never one per drop mask); ``torch.compile(model)`` and
  ``TrainingArguments(torch_compile=True)`` also work: the gated forward is kept out of Dynamo (a graph break at each
  layer), so the gates' state is never a guard and the branch functions are compiled as frames of their own.
- :class:`DropBPCallback` (``callback.py``, a ``TrainerCallback``): a fresh mask before every micro-batch, the
  sensitivity pass and re-allocation at ``sensitivity_at`` of the run on a fixed probe batch, the realised drop
  rate as ``drop_rate`` in the Trainer's logs, and the handler's state in every Trainer checkpoint. On several
  processes (DDP) the ranks draw the same masks, dropped branches touch their weights in the micro-batch whose backward
  DDP reduces, and weights dropped in a whole step get no gradient, as on one process.
"""

from dropbp.integrations.transformers.layout import _transformers_version, check_transformers_version

check_transformers_version(_transformers_version())  # before anything below touches transformers' classes

from dropbp.integrations.transformers.callback import DropBPCallback, default_loss  # noqa: E402
from dropbp.integrations.transformers.layers import (  # noqa: E402
    ATTN_GATE,
    MLP_GATE,
    GatedDecoderLayer,
    attention_branch,
    compile_branches,
    config_dims,
    decoder_layers,
    gated_class,
    install_gates,
    mlp_branch,
    remove_gates,
    set_gate_flops,
)
from dropbp.integrations.transformers.layout import (  # noqa: E402
    LAYOUTS,
    SUPPORTED,
    TRANSFORMERS_VERSIONS,
    Layout,
    layout_of,
    register_decoder_layer,
)

__all__ = [
    "ATTN_GATE",
    "DropBPCallback",
    "GatedDecoderLayer",
    "LAYOUTS",
    "Layout",
    "MLP_GATE",
    "SUPPORTED",
    "TRANSFORMERS_VERSIONS",
    "attention_branch",
    "compile_branches",
    "config_dims",
    "decoder_layers",
    "default_loss",
    "gated_class",
    "install_gates",
    "layout_of",
    "mlp_branch",
    "register_decoder_layer",
    "remove_gates",
    "set_gate_flops",
]
