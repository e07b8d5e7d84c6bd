"""lit_gpt's fast LoRA / QLoRA / adapter-v2 layers compute litgpt's function (fp32, 1e-6), keep its parameters,
state dict, initialisation, dropout RNG stream and merge, and dispatch fewer ATen operators."""

import itertools

import litgpt.adapter_v2
import litgpt.lora
import pytest
import torch
from conftest import tiny_config
from torch.profiler import ProfilerActivity, profile

import lit_gpt.adapter_v2
import lit_gpt.gated
import lit_gpt.lora
from lit_gpt.lora import FastLoRALinear, FastLoRAQKVLinear

TARGETS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")
SUBSETS = list(itertools.product((False, True), repeat=len(TARGETS)))  # all 64
ATTENTION = {"mha": 4, "gqa": 2, "mqa": 1}  # n_query_groups with 4 heads
ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")  # the CPU is shared: two threads on a busy core crawl


def lora_config(n_query_groups: int, subset=(True,) * 6, dropout: float = 0.0, **overrides):
    # alpha / r = 1.5: a scaling that is not a power of two, so folding it into a GEMM is really exercised
    args = dict(n_query_groups=n_query_groups, lora_r=4, lora_alpha=6, lora_dropout=dropout,
                **dict(zip(TARGETS, subset)))
    return tiny_config("llama", litgpt.lora.Config, **{**args, **overrides})


def make_pair(config, seed: int = 0):
    """Plain litgpt's LoRA GPT and ours, built from the same seed: identical parameters without any copying (the
    fast layers only swap classes), then randomised together (lora_B starts at zero) and copied over."""
    torch.manual_seed(seed)
    theirs = litgpt.lora.GPT(config)
    torch.manual_seed(seed)
    ours = lit_gpt.lora.GPT(config)
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(torch.equal(ours_state[k], v) for k, v in theirs_state.items()), "same RNG stream at init"
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)  # logits stay O(1): 1e-6 is then a few ulp
    ours.load_state_dict(theirs.state_dict())
    for model in (theirs, ours):
        litgpt.lora.mark_only_lora_as_trainable(model)
        model.transformer.wte.weight.requires_grad_(True)  # its gradient is the gradient w.r.t. the input
    return ours, theirs


def batch(seed: int = 0, b: int = 2, t: int = 12, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (b, t + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def run(model, x, y, seed: int = 7):
    torch.manual_seed(seed)  # the same dropout masks if, and only if, the RNG is consumed in the same order
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same(ours, theirs, x, y, what: str, steps: int = 1, rtol: float = 0.0):
    for step in range(steps):  # two steps: the second accumulates into existing .grad
        logits, grads = run(ours, x, y, seed=step)
        theirs_logits, theirs_grads = run(theirs, x, y, seed=step)
        torch.testing.assert_close(logits, theirs_logits, rtol=rtol, atol=ATOL, msg=lambda m: f"{what}: logits {m}")
        assert list(grads) == list(theirs_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, theirs_grads[name], rtol=rtol, atol=ATOL,
                                       msg=lambda m: f"{what}: {name} {m}")


def fast_layers(model):
    return [m for m in model.modules() if isinstance(m, litgpt.lora.LoRALinear)]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("attention", ATTENTION)
def test_same_function_as_litgpt_for_every_target_subset(attention, dropout, monkeypatch):
    """Forward, and gradients of every lora_A/lora_B and of the input (the embedding), for all 64 subsets of
    q/k/v/projection/mlp/head, MHA/GQA/MQA, without and with lora_dropout (same seed, same masks)."""
    x, y = batch()
    for subset in SUBSETS:
        ours, theirs = make_pair(lora_config(ATTENTION[attention], subset, dropout))
        assert all(type(m) in (FastLoRALinear, FastLoRAQKVLinear) for m in fast_layers(ours))
        for model in (ours, theirs):
            model.train()
        assert_same(ours, theirs, x, y, f"{attention} {dict(zip(TARGETS, subset))} dropout={dropout}")
    monkeypatch.setattr(lit_gpt.lora, "BATCHED_DEVICE_TYPES", ("cpu", "cuda"))  # the CUDA path, forced on CPU
    for subset in SUBSETS[1::2]:
        assert_same(*make_pair(lora_config(ATTENTION[attention], subset, dropout)), x, y, f"batched {subset}")


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("attention", ATTENTION)
def test_merged_and_unmerged_forward_for_every_target_subset(attention, merge, monkeypatch):
    """Each way of computing the update, forced on every layer (the rule picks per layer by shape, so the tests
    above mix them): the rank-r update on the tokens, or one GEMM on W + s B A with dB's factor made in backward.
    Two steps (the second accumulates into .grad); the no-grad path (a dropped branch) is the same arithmetic."""
    decisions = []
    monkeypatch.setattr(lit_gpt.lora, "merges_weight", lambda *shape: decisions.append(shape) or merge)
    x, y = batch()
    for subset in SUBSETS:
        ours, theirs = make_pair(lora_config(ATTENTION[attention], subset))
        assert_same(ours, theirs, x, y, f"{attention} merge={merge} {dict(zip(TARGETS, subset))}", steps=2)
        with torch.enable_grad():
            logits = ours(x)
        with torch.no_grad():
            assert torch.equal(ours(x), logits)
    assert decisions, "the layers asked the rule"


def test_merge_rule_at_the_shapes_users_run():
    """Merge where the rank-r update on the tokens costs more than merging (many tokens, narrow layers, fp32):
    the benchmark's CPU model; not LLaMA2-7B at seq 512 x micro-batch 2, and never in bf16/fp16."""
    tokens = 4 * 256  # scripts/benchmark.py's CPU default: micro-batch 4 x seq 256, 256 wide, MLP 640
    assert all(lit_gpt.lora.merges_weight(tokens, i, o, torch.float32) for i, o in ((256, 768), (256, 640), (640, 256)))
    assert not lit_gpt.lora.merges_weight(2 * 512, 4096, 4096, torch.float32)
    assert not lit_gpt.lora.merges_weight(2 * 512, 4096, 11008, torch.float32)
    assert not any(lit_gpt.lora.merges_weight(10**6, 64, 64, dtype) for dtype in (torch.bfloat16, torch.float16))
    model = lit_gpt.lora.GPT(lora_config(4, n_embd=64, intermediate_size=128, lora_dropout=0.1))
    model.train()  # with lora_dropout the update's input is not the base's: never merged
    seen = []
    real = lit_gpt.lora.merges_weight
    try:
        lit_gpt.lora.merges_weight = lambda *shape: seen.append(shape) or real(*shape)
        model(torch.randint(0, 64, (4, 32)))
    finally:
        lit_gpt.lora.merges_weight = real
    assert not seen


@pytest.mark.parametrize("attention", ATTENTION)
def test_gradient_accumulation_and_eval_no_grad(attention):
    ours, theirs = make_pair(lora_config(ATTENTION[attention], dropout=0.1))
    x, y = batch(1)
    assert_same(ours, theirs, x, y, attention, steps=2)
    ours.eval()
    theirs.eval()
    with torch.no_grad():  # the path of a dropped DropBP branch and of evaluation
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=ATOL)
        assert torch.equal(ours(x), ours(x))
    with torch.enable_grad():
        logits = ours(x)
    with torch.no_grad():
        assert torch.equal(ours(x), logits)  # the no-grad path is the same arithmetic as the autograd one


@pytest.mark.parametrize("attention", ATTENTION)
def test_merge_gives_litgpt_weights(attention):
    for subset in [(True,) * 6, (True, False, True, False, True, False), (False, True, False, True, False, True)]:
        ours, theirs = make_pair(lora_config(ATTENTION[attention], subset))
        litgpt.lora.merge_lora_weights(ours)
        lit_gpt.lora.merge_lora_weights(theirs)  # the same function (re-exported)
        theirs_state = theirs.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, theirs_state[k]), k
        x, _ = batch()
        assert torch.equal(ours(x), theirs(x)), "merged: the plain linear path, as litgpt"


def test_rank_zero_is_litgpt():
    ours, theirs = make_pair(lora_config(2, lora_r=0))
    assert not any("lora_" in k for k in ours.state_dict())
    x, y = batch()
    logits, grads = run(ours, x, y)
    theirs_logits, theirs_grads = run(theirs, x, y)
    assert torch.equal(logits, theirs_logits) and torch.equal(grads["transformer.wte.weight"],
                                                              theirs_grads["transformer.wte.weight"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["pythia", "falcon", "gemma2"])
def test_other_layouts_with_trainable_base_and_bias(layout, dropout):
    """Biases, GptNeoX/Gemma MLPs, MQA with parallel residual; every parameter trainable (the base weight and bias
    gradients of the layers that compute their base GEMM themselves)."""
    config = tiny_config(layout, litgpt.lora.Config, lora_r=4, lora_alpha=6, lora_dropout=dropout,
                         **dict(zip(TARGETS, (True, False, True, True, True, True))))
    ours, theirs = make_pair(config)
    for model in (ours, theirs):
        model.requires_grad_(True)
    assert layout != "pythia" or any(m.linear.bias is not None for m in fast_layers(ours))
    assert_same(ours, theirs, *batch(), layout, steps=2, rtol=1.3e-6)  # gemma2's logits reach ~2 (1e-6 = 4 ulp)


def test_hooked_base_linear_is_called_like_litgpt():
    """A hook on a base ``linear`` runs, as in litgpt (that layer then calls it and adds the update in place)."""
    ours, theirs = make_pair(lora_config(2, dropout=0.1))
    seen = {id(ours): [], id(theirs): []}
    for model in (ours, theirs):
        for name, module in model.named_modules():
            if name.endswith("attn.qkv.linear") or name.endswith("mlp.fc_1.linear"):
                module.register_forward_hook(lambda m, i, o, k=id(model): seen[k].append(o))
    assert_same(ours, theirs, *batch(), "hooked", steps=2)
    assert len(seen[id(ours)]) == 2 * 2 * 2  # layers x hooked modules x steps
    for a, b in zip(seen[id(ours)], seen[id(theirs)]):  # the base output a hook keeps is not overwritten in place
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


class _ViewOutput(torch.autograd.Function):
    """x W^T returned as a view of a tensor made inside forward, as bitsandbytes' CPU 4-bit kernels return it."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        return g @ weight, None


class _ViewLinear(torch.nn.Linear):
    def forward(self, x):
        return _ViewOutput.apply(x, self.weight)


def test_base_returning_an_autograd_view():
    ours, theirs = make_layers("qkv", 2, (True, True, False))
    for layer in (ours, theirs):
        layer.linear.__class__ = _ViewLinear
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert ours.linear(x)._base is not None
    out, theirs_out = ours(x), theirs(x)
    torch.testing.assert_close(out, theirs_out, rtol=0, atol=ATOL)
    grads = torch.autograd.grad(out.square().mean(), [x, ours.lora_A, ours.lora_B])
    theirs_grads = torch.autograd.grad(theirs_out.square().mean(), [x, theirs.lora_A, theirs.lora_B])
    for a, b in zip(grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=ATOL)


def test_bf16_weights_close_to_litgpt():
    ours, theirs = make_pair(lora_config(1, dropout=0.1))
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x, y = batch()
    logits, grads = run(ours, x, y)
    theirs_logits, theirs_grads = run(theirs, x, y)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, theirs_logits, rtol=0.02, atol=0.05)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16 and g.is_contiguous()
        torch.testing.assert_close(g, theirs_grads[name], rtol=0.05, atol=0.02)


def make_layers(kind: str, n_query_groups: int = 4, enable=(True, False, True), n_in: int = 64, seed: int = 0):
    """One litgpt layer and the same layer (same seed, so the same parameters) turned into ours."""
    layers = []
    for _ in range(2):
        torch.manual_seed(seed)
        head_size, n_head = 16, 4
        if kind == "qkv":
            layer = litgpt.lora.LoRAQKVLinear(n_in, (n_head + 2 * n_query_groups) * head_size, head_size=head_size,
                                              n_head=n_head, n_query_groups=n_query_groups, r=4, lora_alpha=6,
                                              enable_lora=enable, bias=False)
        else:
            layer = litgpt.lora.LoRALinear(n_in, 96, r=4, lora_alpha=6, bias=False)
        if hasattr(layer, "lora_B"):
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.2)
        layer.linear.weight.requires_grad_(False)
        layers.append(layer)
    return lit_gpt.lora.install_fast_lora(layers[0]), layers[1]


@pytest.mark.parametrize("merge", [False, True], ids=["rank_r", "merged"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_any_frozen_subset_of_input_weight_and_lora_factors_trains_like_litgpt(merge, dropout, monkeypatch):
    """Each of the 15 requires-grad combinations of the input, the base weight, lora_A and lora_B (a user may freeze
    A, or train the base too) gives litgpt's gradients, on both forward paths (rank-r update, merged weight) and with
    lora_dropout, for a plain and a fused-QKV layer with one block not adapted."""
    monkeypatch.setattr(lit_gpt.lora, "merges_weight", lambda *shape: merge)
    for kind in ("linear", "qkv"):
        for needs in itertools.product((False, True), repeat=4):
            if not any(needs):
                continue
            ours, theirs = make_layers(kind)
            grads = []
            for layer in (ours, theirs):
                torch.manual_seed(3)
                x = torch.randn(2, 5, 64).requires_grad_(needs[0])
                for p, need in zip((layer.linear.weight, layer.lora_A, layer.lora_B), needs[1:]):
                    p.requires_grad_(need)
                if dropout:
                    layer.lora_dropout = torch.nn.Dropout(dropout)
                torch.manual_seed(4)  # the same lora_dropout mask
                out = layer(x)
                out.pow(2).sum().backward()
                grads.append([t.grad for t in (x, layer.linear.weight, layer.lora_A, layer.lora_B)])
            for name, g, ref in zip(("input", "W", "lora_A", "lora_B"), *grads):
                assert (g is None) == (ref is None), (kind, needs, name)
                if ref is not None:
                    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{kind} {needs} {name}: {m}")


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("attention", ATTENTION)
def test_qkv_layer_every_qkv_subset_and_input_gradient(attention, batched, monkeypatch):
    """Every q/k/v subset of the fused layer; ``batched``: the CUDA path (one batched GEMM for equal, evenly spaced
    blocks), forced on CPU."""
    if batched:
        monkeypatch.setattr(lit_gpt.lora, "BATCHED_DEVICE_TYPES", ("cpu", "cuda"))
        assert lit_gpt.lora._uniform(make_layers("qkv", ATTENTION[attention])[0].lora_spans, torch.device("cpu")) == (
            0 if attention != "mha" else 128)
    for enable in itertools.product((False, True), repeat=3):
        ours, theirs = make_layers("qkv", ATTENTION[attention], enable)
        assert type(ours) is FastLoRAQKVLinear and type(theirs) is litgpt.lora.LoRAQKVLinear
        x = torch.randn(2, 5, 64)
        x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input too
        for inp in (x, x_t):
            results = []
            for layer in (ours, theirs):
                layer.zero_grad(set_to_none=True)
                leaf = inp.detach().requires_grad_(True)
                out = layer(leaf)
                out.backward(torch.linspace(-1, 1, out.numel()).view_as(out) / out.shape[-1])  # grads stay O(1)
                results.append([out, leaf.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"{attention} {enable}: {m}")


def aten_ops(layer, x) -> int:
    """ATen operators dispatched by one forward + backward of ``layer`` (torch.profiler: nested ones included;
    .grad set to None first, so gradient accumulation into existing .grad is not counted)."""

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        out.backward(g)

    g = torch.ones_like(layer(x))
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("attention", ATTENTION)
def test_operator_count_per_layer(attention):
    """Fused QKV with q and v adapted: at most half of litgpt's ATen operators; plain LoRALinear and the fused QKV
    with all of q, k, v adapted: not more (torch 2.13, CPU: 64 vs 153 MHA / 220 GQA, MQA; 46 vs 99; 78 vs 134)."""
    x = torch.randn(2, 8, 64, requires_grad=True)
    ours, theirs = make_layers("qkv", ATTENTION[attention], (True, False, True))
    n_ours, n_theirs = aten_ops(ours, x), aten_ops(theirs, x)
    assert n_ours <= n_theirs / 2, (n_ours, n_theirs)
    ours, theirs = make_layers("qkv", ATTENTION[attention], (True, True, True))
    n_ours, n_theirs = aten_ops(ours, x), aten_ops(theirs, x)
    assert n_ours <= n_theirs, (n_ours, n_theirs)
    ours, theirs = make_layers("linear")
    n_ours, n_theirs = aten_ops(ours, x), aten_ops(theirs, x)
    assert n_ours <= n_theirs, (n_ours, n_theirs)
    x = torch.randn(4, 64, 64, requires_grad=True)  # 256 tokens: the merged-weight forward
    assert lit_gpt.lora.merges_weight(256, 64, 96, torch.float32)
    for kind, enable in (("qkv", (True, False, True)), ("qkv", (True, True, True)), ("linear", None)):
        ours, theirs = make_layers(kind, ATTENTION[attention], enable) if kind == "qkv" else make_layers(kind)
        n_ours, n_theirs = aten_ops(ours, x), aten_ops(theirs, x)
        assert n_ours <= (n_theirs / 2 if enable == (True, False, True) else n_theirs), (kind, enable, n_ours, n_theirs)


def test_qlora_base_matches_litgpt():
    """The same 4-bit bitsandbytes base (quantized on CPU) under litgpt's LoRA and ours."""
    pytest.importorskip("bitsandbytes")
    from lit_gpt.quantize import quantize_frozen_linears

    for n_query_groups in (4, 1):
        config = lora_config(n_query_groups, n_embd=64, intermediate_size=128)
        ours, theirs = make_pair(config)
        for model in (ours, theirs):
            quantize_frozen_linears(model, "nf4", torch.float32)
        kinds = {type(m.linear).__name__ for m in fast_layers(ours)}
        assert kinds == {"Linear4bit"}, kinds
        ours_q = {k: v for k, v in ours.state_dict().items() if "linear.weight" in k}
        theirs_q = theirs.state_dict()
        assert all(torch.equal(v, theirs_q[k]) for k, v in ours_q.items()), "the same quantized base"
        assert_same(ours, theirs, *batch(), f"qlora n_query_groups={n_query_groups}")
        with torch.no_grad():
            torch.testing.assert_close(ours(batch()[0]), theirs(batch()[0]), rtol=0, atol=ATOL)


def test_qlora_gradients_survive_evaluation_on_an_avx512_bf16_cpu(monkeypatch):
    """bitsandbytes repacks a CPU ``Linear4bit`` for inference at its first eval-mode call without grad, on a CPU with
    AVX512-BF16, and its packed kernel has no autograd: every gradient through the base was lost after the recipe's
    first validation. Pretend such a CPU: evaluation must leave the training gradients exactly as they were."""
    bnb = pytest.importorskip("bitsandbytes")
    from lit_gpt.quantize import quantize_frozen_linears

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    config = lora_config(4, n_embd=64, intermediate_size=128)
    model, _ = make_pair(config)
    litgpt.lora.mark_only_lora_as_trainable(model)
    quantize_frozen_linears(model, "nf4", torch.float32)
    x, y = batch()
    _, before = run(model, x, y)
    before = {n: g.clone() for n, g in before.items()}
    assert before["transformer.h.0.attn.qkv.lora_A"].norm() > 0
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(x)  # the recipe's validation before training
    model.train()
    _, after = run(model, x, y)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_bitsandbytes_is_imported_without_its_kernels_package_warning(caplog):
    """On an AVX512-BF16 CPU bitsandbytes warns at import that the optional ``kernels`` package is missing, on every
    QLoRA run: the kernel serves the inference path we switch off. Only that warning is dropped."""
    import logging

    pytest.importorskip("bitsandbytes")
    from lit_gpt.quantize import import_bitsandbytes

    import_bitsandbytes()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


@pytest.mark.parametrize("layout", ["llama", "pythia"])  # without and with a base bias
def test_adapter_v2_matches_litgpt_with_one_kernel_fewer(layout):
    config = tiny_config(layout, litgpt.adapter_v2.Config, adapter_prompt_length=4, adapter_start_layer=0)
    torch.manual_seed(0)
    theirs = litgpt.adapter_v2.GPT(config)
    torch.manual_seed(0)
    ours = lit_gpt.adapter_v2.GPT(config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    for model in (ours, theirs):
        litgpt.adapter_v2.mark_only_adapter_v2_as_trainable(model)
    assert isinstance(ours.lm_head, lit_gpt.adapter_v2.FastAdapterV2Linear)
    x, y = batch()
    for model in (ours, theirs):
        lit_gpt.gated.reset_adapter_cache(model)
    assert_same(ours, theirs, x, y, f"adapter_v2 {layout}")

    def full_size_kernels(layer, x):  # GEMMs and elementwise passes over a whole activation, in one forward
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = layer(x)
        full = {x.numel(), out.numel()}
        return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm") or (
            e.name in ("aten::add", "aten::mul") and any(s and torch.Size(s).numel() in full for s in e.input_shapes)))

    x = torch.randn(2, 8, 32)
    for name, module in ours.named_modules():
        if isinstance(module, litgpt.adapter_v2.AdapterV2Linear) and name != "lm_head":
            theirs_module = theirs.get_submodule(name)
            assert full_size_kernels(module, x[..., :module.linear.in_features].contiguous()) == full_size_kernels(
                theirs_module, x[..., :module.linear.in_features].contiguous()) - 1, name
            break


def test_compiles_without_graph_break():
    """Under torch.compile the layers trace to one graph (no in-place trick, no storage offsets) and match eager."""
    ours, _ = make_pair(lora_config(2, (True, False, True, True, True, False)))
    block = ours.transformer.h[0]
    x = torch.randn(2, 6, 32)
    for module in (block.mlp, block.attn.qkv, block.attn.proj):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(module)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        leaf = x.clone().requires_grad_(True)
        eager = module(leaf)
        eager.sum().backward()
        grads = [leaf.grad] + [p.grad for p in module.parameters() if p.requires_grad]
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        compiled = torch.compile(module, backend="aot_eager")(leaf)
        compiled.sum().backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)
        for a, b in zip([leaf.grad] + [p.grad for p in module.parameters() if p.requires_grad], grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch._dynamo.reset()


def test_autocast_bf16_close_to_litgpt():
    ours, theirs = make_pair(lora_config(2))
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = run(ours, x, y)
        theirs_logits, theirs_grads = run(theirs, x, y)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), theirs_logits.float(), rtol=0.05, atol=0.05)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, theirs_grads[name], rtol=0.1, atol=0.02)
