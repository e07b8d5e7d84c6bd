"""DESIGN.md section 3, invariants 1-3, 6-8, on tiny configs of every block layout litgpt has."""

import random

import litgpt.adapter
import litgpt.adapter_v2
import litgpt.lora
import litgpt.model
import pytest
import torch
from conftest import LAYOUTS, tiny_config

import lit_gpt.adapter
import lit_gpt.adapter_v2
import lit_gpt.lora
import lit_gpt.model
from dropbp import DropBPHandler, compute_sensitivity
from lit_gpt.gated import reset_adapter_cache

VARIANTS = {  # ours -> litgpt's, same config class
    "base": (lit_gpt.model.GPT, litgpt.model.GPT, litgpt.config.Config),
    "lora": (lit_gpt.lora.GPT, litgpt.lora.GPT, litgpt.lora.Config),
    "adapter": (lit_gpt.adapter.GPT, litgpt.adapter.GPT, litgpt.adapter.Config),
    "adapter_v2": (lit_gpt.adapter_v2.GPT, litgpt.adapter_v2.GPT, litgpt.adapter_v2.Config),
}
VARIANT_ARGS = {
    "base": {},
    "lora": dict(lora_r=4, lora_alpha=8, lora_query=True, lora_key=True, lora_value=True, lora_projection=True,
                 lora_mlp=True, lora_head=True),
    "adapter": dict(adapter_prompt_length=4, adapter_start_layer=0),
    "adapter_v2": dict(adapter_prompt_length=4, adapter_start_layer=0),
}


def make_pair(layout: str, variant: str = "base", seed: int = 0):
    """Our gated model and the plain litgpt model with identical weights. For LoRA and adapter v2 the reference is
    our model itself: its layers compute litgpt's function with fewer kernels, equal to litgpt's within 1e-6 but
    not bitwise (tests/test_fast_lora.py), and these tests compare bitwise."""
    ours_cls, theirs_cls, config_cls = VARIANTS[variant]
    if variant in ("lora", "adapter_v2"):
        theirs_cls = ours_cls
    config = tiny_config(layout, config_cls, **VARIANT_ARGS[variant])
    torch.manual_seed(seed)
    theirs = theirs_cls(config)
    if variant != "base":  # adapter gates / LoRA B start at zero: randomise so every parameter matters
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.2)
    ours = ours_cls(config)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def batch(seed: int = 0, b: int = 2, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (b, t + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_of(model, x, y):
    reset_adapter_cache(model)  # needed by plain litgpt adapters (see lit_gpt.gated.reset_adapter_cache)
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def detach_reference(model, mask):
    """Make a plain litgpt model behave as if the branches in ``mask`` were detached (hooks on each branch's
    last module replace its output by a detached copy): the hand-built reference for invariant 2."""
    handles = []
    for i, dropped in enumerate(mask.tolist()):
        if dropped:
            block = model.transformer.h[i // 2]
            last = block.post_attention_norm if i % 2 == 0 else block.post_mlp_norm
            handles.append(last.register_forward_hook(lambda m, inp, out: out.detach()))
    return handles


def all_masks(n: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
    masks += [torch.rand(n, generator=g) < 0.5 for _ in range(count)]
    return masks


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_keys_unchanged_and_every_branch_gated(layout):
    ours, theirs = make_pair(layout)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    handler = DropBPHandler(ours)
    assert [(g.kind, g.layer) for g in handler.gates] == [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_exact_and_gradients_equal_detached_reference(layout, variant):
    """Invariants 1 and 2 (and 8: every layout gets gates that really drop)."""
    ours, theirs = make_pair(layout, variant)
    x, y = batch()
    handler = DropBPHandler(ours)
    theirs_logits = theirs(x)
    for mask in all_masks(len(handler.gates), 3, seed=hash(layout) % 1000):
        handler.set_mask(mask)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        logits = ours(x)
        assert torch.equal(logits, theirs_logits), "forward must be bitwise exact for any mask"

        loss_of(ours, x, y).backward()
        handles = detach_reference(theirs, mask)
        loss_of(theirs, x, y).backward()
        for h in handles:
            h.remove()
        dropped_only = {id(p) for i, g in enumerate(handler.gates) if mask[i] for p in g.branch_parameters()}
        kept = {id(p) for i, g in enumerate(handler.gates) if not mask[i] for p in g.branch_parameters()}
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            if not p.requires_grad:
                continue
            if q.grad is None:
                assert p.grad is None, name
            else:
                assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
            if id(p) in dropped_only and id(p) not in kept:
                assert p.grad is None, f"{name} lives only in dropped branches but got a gradient"
        if bool(mask.any()):
            assert any(ours.get_parameter(n).grad is None for n, p in ours.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("layout", ["llama", "falcon", "gemma2"])
def test_p0_is_plain_litgpt_bitwise_over_training_steps(layout):
    """Invariant 7: with p = 0 the loss curve and gradients are those of plain litgpt, bitwise."""
    ours, theirs = make_pair(layout)
    handler = DropBPHandler(ours, rate=0.0, sampling="bernoulli", seed=3)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    for step in range(3):
        x, y = batch(step)
        handler.sample()
        loss_a, loss_b = loss_of(ours, x, y), loss_of(theirs, x, y)
        loss_a.backward()
        loss_b.backward()
        assert torch.equal(loss_a, loss_b)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(p.grad, q.grad)
        opt_ours.step()
        opt_theirs.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad()


def saved_activation_bytes(model, x, y) -> int:
    """Bytes that autograd saves for backward, parameters excluded (invariant 3)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, x, y)
    return total


def test_dropped_branches_keep_no_activations():
    """Invariant 3: saved bytes scale with the kept fraction; <= 0.2x of p = 0 at p = 0.875 (fixed budget)."""
    config = tiny_config("llama", n_layer=8, n_embd=64, intermediate_size=256, block_size=64)
    model = lit_gpt.model.GPT(config)
    x, y = batch(b=2, t=64)
    handler = DropBPHandler(model, rate=0.0, sampling="fixed")
    handler.sample()
    base = saved_activation_bytes(model, x, y)
    ratios = {}
    for rate in (0.5, 0.75, 0.875):
        handler.set_rates(rate)
        handler.sample()
        ratios[rate] = saved_activation_bytes(model, x, y) / base
    print("saved-activation ratio vs p=0:", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios[0.875] <= 0.2
    assert ratios[0.5] > ratios[0.75] > ratios[0.875]
    # kept fraction plus the never-dropped part (embedding, final norm, head)
    assert ratios[0.5] < 0.6


def test_gate_decision_survives_activation_checkpointing():
    """Invariant 4 (recomputation): a checkpointed block recomputes with the same decision."""
    ours, _ = make_pair("llama")
    handler = DropBPHandler(ours)
    mask = torch.tensor([True, False, False, True])
    x, y = batch()
    handler.set_mask(mask)
    loss_of(ours, x, y).backward()
    plain = [None if p.grad is None else p.grad.clone() for p in ours.parameters()]
    ours.zero_grad(set_to_none=True)
    for block in ours.transformer.h:
        forward = block.forward
        block.forward = lambda *a, _f=forward: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False)
    loss_of(ours, x, y).backward()
    for a, p in zip(plain, ours.parameters()):
        assert (a is None and p.grad is None) or torch.allclose(a, p.grad, atol=1e-7)


def brute_force_sensitivity(theirs, x, y, n_gates, metric):
    theirs.zero_grad(set_to_none=True)
    loss_of(theirs, x, y).backward()
    ref = [p.grad.clone() for p in theirs.parameters()]
    out = []
    for i in range(n_gates):
        theirs.zero_grad(set_to_none=True)
        mask = torch.zeros(n_gates, dtype=torch.bool)
        mask[i] = True
        handles = detach_reference(theirs, mask)
        loss_of(theirs, x, y).backward()
        for h in handles:
            h.remove()
        s = 0.0
        for r, p in zip(ref, theirs.parameters()):
            g = torch.zeros_like(r) if p.grad is None else p.grad
            s += float((r.double().norm() - g.double().norm()) ** 2) if metric == "gradnorm" else float(
                ((r.double() - g.double()) ** 2).sum()
            )
        out.append(s)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["grad", "gradnorm"])
def test_sensitivity_matches_algorithm_1_and_leaves_training_untouched(metric):
    """Invariant 6, and the values of Alg. 1 computed by brute force."""
    ours, theirs = make_pair("pythia")  # pythia has dropout-free parallel blocks
    ours.config.attention_dropout = 0.0
    handler = DropBPHandler(ours, rate=0.5, seed=1)
    x, y = batch(1)
    # an accumulation window in progress: one micro-batch already back-propagated
    handler.sample()
    loss_of(ours, *batch(2)).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in ours.named_parameters()}
    ours.transformer.h[1].eval()  # a mixed train/eval state must come back as it was
    mask, gen_state = handler.mask.clone(), handler.generator.get_state()
    torch.manual_seed(123)
    random.seed(5)
    cpu_rng, py_rng = torch.get_rng_state(), random.getstate()

    s = compute_sensitivity(handler, ours, lambda: loss_of(ours, x, y), metric=metric)

    assert torch.equal(torch.get_rng_state(), cpu_rng) and random.getstate() == py_rng
    assert torch.equal(handler.mask, mask) and torch.equal(handler.generator.get_state(), gen_state)
    assert [g.dropped for g in handler.gates] == mask.tolist()
    assert ours.training and not ours.transformer.h[1].training and ours.transformer.h[0].training
    for n, p in ours.named_parameters():
        assert (grads[n] is None and p.grad is None) or torch.equal(grads[n], p.grad), n
    expected = brute_force_sensitivity(theirs, x, y, len(handler.gates), metric)
    assert torch.allclose(s, expected, rtol=1e-4, atol=1e-10)
    assert bool((s > 0).all())
