"""litgpt's LoRA GPT with a DropBP gate on every attention and MLP residual branch, and LoRA layers that compute
litgpt's function with the fewest kernels.

litgpt 0.5.13's ``LoRAQKVLinear`` sends the fused q/k/v update through a grouped ``conv1d`` between two transposes,
plus a zero-filled ``index_copy_`` whenever one of q, k, v is not adapted, then scales and adds the full-width
result; its ``LoRALinear`` chains two matmuls on transposed weights, then scales, then adds: extra kernels, copies
and two full-size elementwise passes per layer in each direction. :class:`FastLoRALinear` and
:class:`FastLoRAQKVLinear` are litgpt's classes with only ``forward`` replaced. With ``s`` the scaling, ``i`` over
the adapted blocks (q, k, v of the fused QKV layer; one block elsewhere) and ``g`` the output gradient:

    forward   y = x W^T (+ b);  ht = A dx^T;  y_i^T += s * B_i ht_i              (dx = lora_dropout(x))
    backward  dB_i^T = s * ht_i g_i;  dh_i^T = s * B_i^T g_i^T;  dA = dh^T dx;  dx_grad = g W + dh A

one GEMM per term and block (``alpha`` carries ``s``), each writing straight into its slice of the result (strided
views, no copies); on CUDA, equal evenly spaced blocks (MHA's q, k, v) share one strided-batched GEMM. The LoRA
input gradient lands in the base's with ``addmm_``. No conv1d, zero padding, scale or
add kernel remains. Without dropout, when many tokens pass a narrow fp32 layer (:func:`merges_weight`: a small
model on the CPU), forward is instead one GEMM on ``W + s * B A`` (as full fine-tuning's), and backward makes
``ht`` itself. On a plain ``nn.Linear`` base the layer runs its base GEMMs itself (:class:`_LoRALinear`); on
any other base (bitsandbytes' ``Linear4bit`` for QLoRA, a hooked linear, autocast) it calls ``self.linear`` and
adds the update into its output in place (:class:`_LoRAUpdate`); under ``torch.compile`` it uses plain out-of-place
ops that inductor fuses. Parameters (names, shapes, initialisation), ``merge`` and the RNG use are litgpt's: the one
RNG consumer, ``lora_dropout(x)``, is called once per layer on the same input as in litgpt, so checkpoints,
``merge_lora_weights``, ``mark_only_lora_as_trainable``, litgpt's tools and dropout masks are interchangeable.
"""

from typing import Optional

import litgpt.lora
import torch
import torch.nn.modules.module as _module_hooks
from litgpt.lora import Config, mark_only_lora_as_trainable, merge_lora_weights  # noqa: F401 (re-exported)
from torch import nn
from torch.autograd.function import once_differentiable

from lit_gpt.gated import GatedBlock, install_gates

Spans = tuple  # ((first output column, end output column, first row of lora_B), ...) per adapted block

Layout = tuple  # (scaling, spans, rank r, rows of lora_B): what backward needs besides tensors, kept on ctx by forward


def _view(t: torch.Tensor, size: tuple, stride: tuple, offset: int = 0) -> torch.Tensor:
    """A strided view of the contiguous tensor ``t``: one ATen op, where slicing then transposing costs up to five."""
    return t.as_strided(size, stride, t.storage_offset() + offset)


def _blocks(spans: Spans, r: int):
    """Per adapted block: index, first output column, width, first row of ``lora_B``, first row of ``lora_A``."""
    return ((i, c0, c1 - c0, b0, i * r) for i, (c0, c1, b0) in enumerate(spans))


# Devices where equal, evenly spaced blocks share one batched GEMM: one strided-batched cuBLAS kernel on CUDA. On CPU
# torch runs ``baddbmm`` as a loop of per-batch GEMMs (nothing saved, more operators dispatched): a loop of addmm_.
BATCHED_DEVICE_TYPES = ("cuda",)


def _uniform(spans: Spans, device: torch.device) -> int:
    """The column stride between the adapted blocks when there are several of equal width evenly spaced (MHA's q, k,
    v or any two of them, GQA's k and v) on a device in :data:`BATCHED_DEVICE_TYPES`; else 0."""
    if len(spans) < 2 or device.type not in BATCHED_DEVICE_TYPES:
        return 0
    width, stride = spans[0][1] - spans[0][0], spans[1][0] - spans[0][0]
    ok = all(c1 - c0 == width and c0 == spans[0][0] + i * stride for i, (c0, c1, _) in enumerate(spans))
    return stride if ok else 0


def _rank_factor(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``ht = A x^T`` of shape (N r, tokens), for ``x`` contiguous. Kept transposed: in MKL a GEMM whose output has
    only r columns runs several times slower than the same GEMM with an r-row output (measured: 200 vs 76 us at
    1024 x 256 x 8); backward makes the same choice for dB^T and dh^T."""
    n_in = x.shape[-1]
    m = x.numel() // n_in
    return torch.mm(A, _view(x, (n_in, m), (1, n_in)))


def _B_views(B: torch.Tensor, spans: Spans, stride: int) -> list:
    """``B_i`` per adapted block (one 3-d view when the blocks are batched: ``stride``, from :func:`_uniform`)."""
    r = B.shape[1]
    if stride:
        n, width = len(spans), spans[0][1] - spans[0][0]
        return [_view(B, (n, width, r), (width * r, r, 1))]
    if len(spans) == 1:
        return [B]
    return [_view(B, (width, r), (r, 1), b0 * r) for i, c0, width, b0, a0 in _blocks(spans, r)]


def _ht_views(ht: torch.Tensor, spans: Spans, stride: int) -> list:
    """``ht_i`` per adapted block, laid out as :func:`_B_views`."""
    n = len(spans)
    r, m = ht.shape[0] // n, ht.shape[1]
    if stride:
        return [_view(ht, (n, r, m), (r * m, m, 1))]
    if n == 1:
        return [ht]
    return [_view(ht, (r, m), (m, 1), a0 * m) for i, c0, width, b0, a0 in _blocks(spans, r)]


def _factor_views(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spans: Spans, with_ht: bool = True) -> tuple:
    """The batched-blocks stride (:func:`_uniform`), ``B_i`` and ``ht_i`` per block: the views forward updates
    through and backward differentiates through, made alike by both. Without ``with_ht`` (lora_B needs no gradient)
    each ``ht_i`` is None, as forward saves them then, and ``x`` may be None."""
    stride = _uniform(spans, B.device)
    B_blocks = _B_views(B, spans, stride)
    return stride, B_blocks, _ht_views(_rank_factor(x, A), spans, stride) if with_ht else [None] * len(B_blocks)


def _lora_forward(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  spans: Spans) -> tuple:
    """``y[..., c0:c1] += scaling * (x A_i^T) B_i^T`` for each block, in place (``y`` and ``x`` contiguous).

    The update of block i is written as ``y_i^T += s * B_i ht_i`` (the same GEMM as ``y_i += s * ht_i^T B_i^T``),
    so that ``B_i`` and ``ht_i``, the views backward needs too, are made once. Returns them."""
    n_out = y.shape[-1]
    m = y.numel() // n_out
    stride, B_blocks, ht_blocks = _factor_views(x, A, B, spans)
    if stride:
        n, width = len(spans), spans[0][1] - spans[0][0]
        _view(y, (n, width, m), (stride, 1, n_out), spans[0][0]).baddbmm_(B_blocks[0], ht_blocks[0], alpha=scaling)
        return B_blocks, ht_blocks
    for (i, c0, width, b0, a0), B_i, ht_i in zip(_blocks(spans, B.shape[1]), B_blocks, ht_blocks):
        _view(y, (width, m), (1, n_out), c0).addmm_(B_i, ht_i, alpha=scaling)
    return B_blocks, ht_blocks


def merges_weight(tokens: int, n_in: int, n_out: int, dtype: torch.dtype) -> bool:
    """Whether a LoRA layer adds ``scaling * B A`` into a copy of its base weight for the forward GEMM instead of
    running the rank-r update on the tokens: when that costs fewer FLOPs (``n_in n_out r`` against
    ``tokens (n_in + n_out) r``: many tokens through a narrow layer, as on a small model) and the weight is fp32
    (in bf16/fp16 the small update would be rounded at the weight's precision, not at the output's)."""
    return dtype == torch.float32 and tokens * (n_in + n_out) > n_in * n_out


def _merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, spans: Spans) -> torch.Tensor:
    """A new tensor: ``W`` with ``scaling * B_i A_i`` added to the rows of each adapted block."""
    n_out, n_in = W.shape
    r = B.shape[1]
    if len(spans) == 1 and spans[0][1] - spans[0][0] == n_out:
        return torch.addmm(W, B, A, alpha=scaling)
    merged = W.clone()
    for (i, c0, width, b0, a0), B_i in zip(_blocks(spans, r), _B_views(B, spans, 0)):
        _view(merged, (width, n_in), (n_in, 1), c0 * n_in).addmm_(
            B_i, _view(A, (r, n_in), (n_in, 1), a0 * n_in), alpha=scaling)
    return merged


def _lora_backward(g: torch.Tensor, x: Optional[torch.Tensor], B_blocks, ht_blocks, layout: Layout, need_h: bool,
                   need_A: bool, need_B: bool) -> tuple:
    """dB = s g^T h and dA = dh^T x with dh = s g B, for the contiguous upstream gradient ``g``. Returns dA, dB and
    dh as an (M, N r) view (for the caller's input gradient ``dh A``), or None where not needed.

    dB^T = s * ht g and dh^T = s * B^T g^T have r-row outputs, the fast orientation (dh^T_i is written through its
    transposed view as g_i B_i, the same GEMM, to share the g_i view). dB is returned as the transposed view of
    dB^T: AccumulateGrad lays it out like lora_B (one small copy) or adds it into an existing .grad."""
    scaling, spans, r, n_b = layout
    n_out = g.shape[-1]
    m = g.numel() // n_out
    n = len(spans)
    gBt = torch.empty((r, n_b), dtype=g.dtype, device=g.device) if need_B else None
    ght = torch.empty((r * n, m), dtype=g.dtype, device=g.device) if need_h else None
    ght_t = None
    stride = _uniform(spans, g.device)
    if stride:  # one batched GEMM for all blocks (their views were saved as one 3-d view each)
        width = spans[0][1] - spans[0][0]
        g3 = _view(g, (n, m, width), (stride, n_out, 1), spans[0][0])
        if need_B:
            _view(gBt, (n, r, width), (width, n_b, 1)).baddbmm_(ht_blocks[0], g3, beta=0, alpha=scaling)
        if need_h:
            _view(ght, (n, m, r), (r * m, 1, m)).baddbmm_(g3, B_blocks[0], beta=0, alpha=scaling)
    else:
        for (i, c0, width, b0, a0), B_i, ht_i in zip(_blocks(spans, r), B_blocks, ht_blocks):
            g_i = _view(g, (m, width), (n_out, 1), c0)
            if need_B:
                (gBt if n == 1 else _view(gBt, (r, width), (n_b, 1), b0)).addmm_(ht_i, g_i, beta=0, alpha=scaling)
            if need_h:
                ght_t = _view(ght, (m, r), (1, m), a0 * m)
                ght_t.addmm_(g_i, B_i, beta=0, alpha=scaling)
    if need_h and n > 1:
        ght_t = _view(ght, (m, r * n), (1, m))
    gA = torch.mm(ght, x.view(m, x.shape[-1])) if need_A else None
    gB = _view(gBt, (n_b, r), (1, n_b)) if need_B else None
    return gA, gB, ght_t


class _LoRAUpdate(torch.autograd.Function):
    """``y + scaling * lora(x)``, written into ``y``: any base layer's output (which autograd does not keep)."""

    @staticmethod
    def forward(ctx, y, x, A, B, scaling, spans):
        B_blocks, ht_blocks = _lora_forward(y, x, A, B, scaling, spans)
        ctx.mark_dirty(y)
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        k = ctx.k = len(B_blocks)
        ctx.save_for_backward(x if need_A else None, A if need_x else None,
                              *(B_blocks if need_x or need_A else [None] * k), *(ht_blocks if need_B else [None] * k))
        ctx.layout = (scaling, spans, B.shape[1], B.shape[0])  # a plain tuple: no Python call per layer
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, A, *blocks = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        k = ctx.k
        if not g.is_contiguous():
            g = g.contiguous()
        gA, gB, ght_t = _lora_backward(g, x, blocks[:k], blocks[k:], ctx.layout, need_x or need_A, need_A, need_B)
        gx = torch.mm(ght_t, A).view(*g.shape[:-1], A.shape[1]) if need_x else None
        return g, gx, gA, gB, None, None


class _LoRALinear(torch.autograd.Function):
    """A whole LoRA linear layer on a plain ``nn.Linear`` base: ``x W^T + b + scaling * lora(dx)``, where ``dx`` is
    ``lora_dropout(x)`` (None when it is ``x`` itself). Owning the base GEMMs lets backward write the LoRA part of
    the input gradient straight into the base's (``addmm_``: no separate add) and saves the base linear's autograd
    nodes and reshapes. Without dropout, where :func:`merges_weight` says so, forward is one GEMM on
    ``W + scaling * B A``, as full fine-tuning's forward, and backward first makes the rank-r factor ``ht`` that
    forward did not need."""

    @staticmethod
    def forward(ctx, x, dx, W, b, A, B, scaling, spans):
        n_in, n_out = x.shape[-1], W.shape[0]
        m = x.numel() // n_in
        shared = dx is None
        merged = shared and merges_weight(m, n_in, n_out, x.dtype)
        y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
        x2, W_forward = x.view(m, n_in), _merged_weight(W, A, B, scaling, spans) if merged else W
        if b is None:
            torch.mm(x2, W_forward.t(), out=y.view(m, n_out))
        else:
            torch.addmm(b, x2, W_forward.t(), out=y.view(m, n_out))
        need_x, need_dx, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        ctx.layout, ctx.shared, ctx.merged = (scaling, spans, B.shape[1], B.shape[0]), shared, merged
        if merged:  # backward makes the factors from x, A and B (parameters: saving them costs no memory)
            ctx.save_for_backward(x if need_W or need_A or need_B else None, None, W if need_x else None, A, B)
            return y
        lx = x if shared else dx
        B_blocks, ht_blocks = _lora_forward(y, lx, A, B, scaling, spans)
        ctx.save_for_backward(x if need_W or (shared and need_A) else None, lx if need_A and not shared else None,
                              W if need_x else None, A if need_x or need_dx else None,
                              *(B_blocks if need_x or need_dx or need_A else [None] * len(B_blocks)),
                              *(ht_blocks if need_B else [None] * len(ht_blocks)))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        need_x, need_dx, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        shared = ctx.shared
        if ctx.merged:
            x, dx, W, A, B = ctx.saved_tensors
            _, B_blocks, ht_blocks = _factor_views(x, A, B, ctx.layout[1], with_ht=need_B)
        else:
            x, dx, W, A, *blocks = ctx.saved_tensors
            B_blocks, ht_blocks = blocks[:len(blocks) // 2], blocks[len(blocks) // 2:]
        need_lx = need_x if shared else need_dx  # the gradient w.r.t. the LoRA branch's input
        if not g.is_contiguous():
            g = g.contiguous()
        gA, gB, ght_t = _lora_backward(g, x if shared else dx, B_blocks, ht_blocks, ctx.layout, need_lx or need_A,
                                       need_A, need_B)
        n_out = g.shape[-1]
        m = g.numel() // n_out
        g2 = g.view(m, n_out)
        gx = gdx = gW = gb = None
        if need_x:
            gx = torch.mm(g2, W)
            if shared:
                gx.addmm_(ght_t, A)
            gx = gx.view(*g.shape[:-1], W.shape[1])
        if need_dx:
            gdx = torch.mm(ght_t, A).view(*g.shape[:-1], A.shape[1])
        if need_W:
            gW = torch.mm(g2.t(), x.view(m, x.shape[-1]))
        if need_b:
            gb = g2.sum(0)
        return gx, gdx, gW, gb, gA, gB, None, None


def _functional_update(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                       spans: Spans) -> torch.Tensor:
    """The same function out of place, for torch.compile: one GEMM through ``B`` laid out block-diagonally over the
    full output width (zeros where a block is not adapted), which inductor fuses with the scale and the add. (A
    ``cat`` of per-block slices instead miscompiles under dynamic shapes in torch 2.13: the attention backward then
    asserts the strides of the first sequence length.)"""
    r = B.shape[1]
    h = torch.nn.functional.linear(x, A)
    if len(spans) == 1 and spans[0][1] - spans[0][0] == y.shape[-1]:
        return y + torch.nn.functional.linear(h, B) * scaling
    B_full = B.new_zeros(y.shape[-1], len(spans) * r)
    for i, c0, width, b0, a0 in _blocks(spans, r):
        B_full[c0:c0 + width, a0:a0 + r] = B[b0:b0 + width]
    return y + torch.nn.functional.linear(h, B_full) * scaling


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or any(getattr(_module_hooks, name, None) for name in _GLOBAL_HOOKS))


def _owns_base(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer may compute its base ``nn.Linear`` itself: a plain one, in x's dtype, with no hooks that
    calling it would run, and no autocast (whose casts ``F.linear`` applies)."""
    return (type(linear) is nn.Linear and linear.weight.dtype == x.dtype and not _hooked(linear)
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())


def lora_linear(layer: litgpt.lora.LoRALinear, x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """``layer.linear(x)`` plus the LoRA update of ``layer.lora_dropout(x)``: litgpt's function and RNG use (the
    dropout call is the only RNG consumer), in the fewest kernels."""
    linear, A, B = layer.linear, layer.lora_A, layer.lora_B
    if _owns_base(linear, x):
        dx = layer.lora_dropout(x)
        dtype = x.dtype
        shared = dx is x
        x = _contiguous(x, dtype)
        dx = None if shared else _contiguous(dx, dtype)
        A, B = _contiguous(A, dtype), _contiguous(B, dtype)
        W, b = linear.weight, linear.bias
        if torch.is_grad_enabled():
            return _LoRALinear.apply(x, dx, W, b, A, B, layer.scaling, spans)
        return _LoRALinear.forward(_NoGradContext(), x, dx, W, b, A, B, layer.scaling, spans)
    y = linear(x)
    if _hooked(linear) and not torch.compiler.is_compiling():
        y = y.clone()  # a hook may keep the base output: leave it unchanged, as litgpt does
    return lora_update(y, layer.lora_dropout(x), A, B, layer.scaling, spans)


class _NoGradContext:
    """Stands in for autograd's ctx when nothing is recorded (grad mode off: a dropped DropBP branch, evaluation),
    so that the forward arithmetic is the very same: saves nothing."""

    needs_input_grad = (False,) * 8

    def save_for_backward(self, *tensors) -> None:
        pass


def lora_update(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                spans: Spans) -> torch.Tensor:
    """Add the LoRA update of ``x`` (already through ``lora_dropout``) to ``y``, the output of any base layer
    (bitsandbytes' ``Linear4bit`` for QLoRA, a hooked or autocast linear), in place when autograd allows it;
    computed in ``y``'s dtype (under autocast litgpt's update runs in the autocast dtype too)."""
    dtype = y.dtype
    y, x, A, B = (_contiguous(t, dtype) for t in (y, x, A, B))
    if y._base is not None and y.requires_grad and not torch.compiler.is_compiling():
        # an autograd view (bitsandbytes' CPU 4-bit kernels return one once their weights are packed for inference)
        # cannot be updated in place: one copy, as litgpt's out-of-place add makes anyway
        y = y.clone()
    if torch.compiler.is_compiling():  # traceable ops only (no storage offsets, no in-place on inputs): inductor
        return _functional_update(y, x, A, B, scaling, spans)  # plans the kernels itself
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or A.requires_grad or B.requires_grad):
        return _LoRAUpdate.apply(y, x, A, B, scaling, spans)
    _lora_forward(y, x, A, B, scaling, spans)
    return y


class FastLoRALinear(litgpt.lora.LoRALinear):
    """litgpt's ``LoRALinear`` (same parameters, init and merge) whose LoRA update costs two GEMMs forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return self.linear(x)
        return lora_linear(self, x, ((0, self.lora_B.shape[0], 0),))


class FastLoRAQKVLinear(litgpt.lora.LoRAQKVLinear):
    """litgpt's ``LoRAQKVLinear`` whose update is written only into the adapted q, k, v column blocks.

    litgpt's fused layout is ``[q (n_head * head_size) | k (n_query_groups * head_size) | v (same)]``, for MHA, GQA
    and MQA alike; ``lora_A`` stacks ``r`` rows per adapted block and ``lora_B`` the adapted blocks' rows, in q, k, v
    order (what litgpt's grouped/split ``conv1d`` pairs up)."""

    @property
    def lora_spans(self) -> Spans:
        spans = self.__dict__.get("_lora_spans")
        if spans is None:
            q = self.head_size * self.n_head
            kv = self.head_size * self.n_query_groups
            blocks = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
            spans, b0 = [], 0
            for enabled, (c0, c1) in zip(self.enable_lora, blocks):
                if enabled:
                    spans.append((c0, c1, b0))
                    b0 += c1 - c0
            spans = self.__dict__["_lora_spans"] = tuple(spans)
        return spans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or not any(self.enable_lora) or self.merged:
            return self.linear(x)
        return lora_linear(self, x, self.lora_spans)


FAST = {litgpt.lora.LoRALinear: FastLoRALinear, litgpt.lora.LoRAQKVLinear: FastLoRAQKVLinear}


def install_fast_lora(model: nn.Module) -> nn.Module:
    """Turn every litgpt ``LoRALinear``/``LoRAQKVLinear`` of a built model into its fast subclass, in place (only the
    class changes: no parameter is created or re-initialised, state-dict keys and values stay litgpt's)."""
    for module in model.modules():
        fast: Optional[type] = FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


class Block(GatedBlock, litgpt.lora.Block):
    pass


class GPT(litgpt.lora.GPT):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        install_fast_lora(self)
        install_gates(self, Block)
