"""``torch.compile`` of gated models: the gate decides in Python, outside any compiled code, and only the branch
functions are compiled. Shared by litgpt's gated blocks (``lit_gpt/gated.py``) and the Transformers integration.

Why the decision must stay out of Dynamo: a gate's state (``dropped``, ``skipped``, ``scale``) read inside traced
code becomes a guard, so every new drop mask would recompile the traced frame, and after Dynamo's recompile limit
that frame would run uncompiled. Kept outside, a branch function needs a graph per grad mode (a dropped branch runs
under ``no_grad``) and per whether its input requires grad, never one per mask.
"""

import functools
from typing import Callable, Sequence

import torch

# Dynamo settings that hold only while a compiled branch function is compiled and run (``config.patch`` around it):
# recompile_limit 16 (Dynamo's default: 8): a branch function is one code object shared by every block, and it
# needs a graph per grad mode, input-requires-grad and kind of block (litgpt's adapter: with and without the
# prompt), plus one for evaluation; none of them may fall back to eager.
BRANCH_DYNAMO_CONFIG = dict(recompile_limit=16)
# Added for branches that read an integer attribute differing between blocks (litgpt adapter's ``block_idx``): such
# integers become dynamic instead of a guard, hence a graph, per block.
DYNAMIC_MODULE_INTS = dict(allow_unspec_int_on_nn_module=True)


def compile_branch_functions(functions: Sequence[Callable], dynamic_module_ints: bool = False,
                             **compile_options) -> tuple:
    """``torch.compile`` each function with ``compile_options`` (default ``dynamic=True``: fine-tuning batches vary
    in length) under :data:`BRANCH_DYNAMO_CONFIG`, which holds only inside the compiled functions: the rest of the
    process, a user's own compiled modules included, keeps Dynamo's settings.

    ``dynamic_module_ints``: add :data:`DYNAMIC_MODULE_INTS`, for branches that read a per-block integer. Dynamo
    then also makes every integer that the branch reads through a module symbolic (the config's widths and head
    counts), and with dynamic shapes reasons over them with the feature dimensions of the inputs: those are marked
    static on every call (:func:`feature_dims_static`), which spares Dynamo part of that reasoning. Without it, those
    integers are constants and only the batch and sequence dimensions are symbolic, which traces faster still."""
    compile_options = {"dynamic": True, **compile_options}
    settings = {**BRANCH_DYNAMO_CONFIG, **(DYNAMIC_MODULE_INTS if dynamic_module_ints else {})}
    with_settings = torch._dynamo.config.patch(**settings)  # re-entrant: a stack of saved values
    compiled = tuple(with_settings(torch.compile(f, **compile_options)) for f in functions)
    if dynamic_module_ints and compile_options["dynamic"]:
        return tuple(functools.partial(_call_with_static_features, f) for f in compiled)
    return compiled


def _call_with_static_features(compiled: Callable, module, hidden: torch.Tensor, *rest):
    feature_dims_static(hidden, rest)
    return compiled(module, hidden, *rest)


def feature_dims_static(hidden: torch.Tensor, rest: tuple) -> None:
    """Mark static for Dynamo the last dimension of a branch's hidden states (``(batch, seq, features)``) and of
    every other tensor argument whose last dimension is not the sequence length (rotary tables; not a mask)."""
    seq_len = hidden.shape[-2] if hidden.dim() >= 2 else None
    torch._dynamo.mark_static(hidden, hidden.dim() - 1)
    for t in rest:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] != seq_len:
            torch._dynamo.mark_static(t, t.dim() - 1)


def outside_dynamo(fn: Callable) -> Callable:
    """Run ``fn``'s own frame uncompiled under ``torch.compile``, but let Dynamo compile the frames it calls
    (``torch._dynamo.disable(fn, recursive=False)``): a gate's decision code in a model compiled as a whole. Dynamo
    graph-breaks where traced code calls ``fn``; ``fn`` then runs in Python and the branch functions it calls are
    compiled as frames of their own, guarded on the branch's inputs, not on the gates."""
    return torch._dynamo.disable(fn, recursive=False)


@torch._dynamo.disable
def run_eager(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with Dynamo off for it and everything it calls (under ``torch.compile`` too)."""
    return fn(*args, **kwargs)
