"""``torch.compile`` of gated models: the gate decides in Python, outside any compiled code, and only the branch
functions are compiled. Shared by litgpt's gated blocks (``lit_gpt/gated.py``) and the Transformers integration.

Why the decision must stay out of Dynamo: a gate's state (``dropped``, ``skipped``, ``scale``) read inside traced
code becomes a guard, so every new drop mask would recompile the traced frame, and after Dynamo's recompile limit
that frame would run uncompiled. Kept outside, a branch function needs a graph per grad mode (a dropped branch runs
under ``no_grad``) and per whether its input requires grad, never one per mask.
"""

from typing import Callable, Sequence

import torch

# Dynamo settings that hold only while a compiled branch function is compiled and run (``config.patch`` around it):
# - recompile_limit 16 (Dynamo's default: 8): a branch function is one code object shared by every block, and it
#   needs a graph per grad mode, input-requires-grad and kind of block (litgpt's adapter: with and without the
#   prompt), plus one for evaluation; none of them may fall back to eager;
# - allow_unspec_int_on_nn_module: integer attributes of modules (litgpt adapter's ``block_idx``) are dynamic, not
#   a guard per block.
BRANCH_DYNAMO_CONFIG = dict(recompile_limit=16, allow_unspec_int_on_nn_module=True)


def compile_branch_functions(functions: Sequence[Callable], **compile_options) -> tuple:
    """``torch.compile`` each function with ``compile_options`` (default ``dynamic=True``: fine-tuning batches vary
    in length) under :data:`BRANCH_DYNAMO_CONFIG`, which holds only inside the compiled functions: the rest of the
    process, a user's own compiled modules included, keeps Dynamo's settings."""
    compile_options = {"dynamic": True, **compile_options}
    with_settings = torch._dynamo.config.patch(**BRANCH_DYNAMO_CONFIG)  # re-entrant: a stack of saved values
    return tuple(with_settings(torch.compile(f, **compile_options)) for f in functions)


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
