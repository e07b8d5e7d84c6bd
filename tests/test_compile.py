"""``--compile``: the branch functions compiled train like eager under changing drop masks, with a bounded number of
graphs (per branch: grad mode x input requires grad, shared by every block), never one per mask.

The graphs, their count and their gradients come from Dynamo and AOTAutograd, so these tests compile with the
"aot_eager" backend (a third of inductor's time on this CPU); inductor's own code runs in the LoRA recipe's compiled
test (tests/test_recipes.py) and the benchmark's operator counts (tests/test_benchmark.py)."""

import litgpt.adapter_v2
import litgpt.lora
import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters

import lit_gpt.adapter_v2
import lit_gpt.lora
import lit_gpt.model
from dropbp import DropBPHandler
from lit_gpt.gated import compile_branches

pytestmark = pytest.mark.usefixtures("one_thread")


def build(method: str, n_layer: int):
    if method == "full":
        return lit_gpt.model.GPT(tiny_config("llama", n_layer=n_layer))
    if method == "adapter":  # the prompt from block 1 on: blocks with and without it
        model = lit_gpt.adapter_v2.GPT(tiny_config("llama", litgpt.adapter_v2.Config, n_layer=n_layer,
                                                   adapter_start_layer=1))
        litgpt.adapter_v2.mark_only_adapter_v2_as_trainable(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "gating_factor" in name:
                    p.fill_(0.5)  # it starts at zero: give the adapter prompt a part in the output
        return model
    # litgpt's default LoRA targets (q and v only)
    config = tiny_config("llama", litgpt.lora.Config, n_layer=n_layer, lora_r=4, lora_alpha=8, lora_query=True,
                         lora_value=True)
    model = lit_gpt.lora.GPT(config)
    litgpt.lora.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # lora_B starts at zero: give the update a value, so that it is really tested
    return model


def train(model, steps: int, seed: int = 0) -> tuple:
    handler = DropBPHandler(model, rate=0.5, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses, masks = [], []
    for _ in range(steps):
        handler.sample()
        masks.append(handler.mask.clone())
        x = torch.randint(0, 64, (2, 17), generator=g)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), masks, model


# Shapes: every batch here has one shape, and the graph count under the recipes' dynamic shapes is what the adapter
# case checks (a static block_idx would compile a graph per block) and what the recipes' compiled test runs; full
# fine-tuning and LoRA compile static here, at a third of the time (symbolic shapes cost Dynamo most of its time).
# Over 30 s for the adapter (dynamic, and two kinds of block double the graphs): Dynamo and AOTAutograd trace every
# graph that the property counts.
@pytest.mark.parametrize("method, dynamic", [("full", False), ("lora", False), ("adapter", True)],
                         ids=["full", "lora", "adapter"])
def test_compiled_branches_train_like_eager_with_bounded_graphs(method, dynamic):
    torch._dynamo.reset()
    counters.clear()
    n_layer = 3
    torch.manual_seed(0)
    eager = build(method, n_layer)
    torch.manual_seed(0)
    dynamo_config = dict(torch._dynamo.config.get_config_copy())
    compiled = compile_branches(build(method, n_layer), backend="aot_eager", dynamic=dynamic)
    assert all(block.branches is not None for block in compiled.transformer.h)
    try:
        eager_losses, masks, eager = train(eager, steps=3)
        compiled_losses, compiled_masks, compiled = train(compiled, steps=3)
        graphs = counters["stats"]["unique_graphs"]
        assert all(torch.equal(a, b) for a, b in zip(masks, compiled_masks))
        assert len({tuple(m.tolist()) for m in masks}) == 3, "the masks change from step to step"
        stacked = torch.stack(masks)
        assert stacked.any(0).any() and (~stacked).any(0).any(), "some branches dropped, some kept"
        torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        if method == "adapter":  # evaluation: the second call reads the prefix cache that the first one set
            x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                for _ in range(2):
                    torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-5)
            compiled.train()
            graphs = counters["stats"]["unique_graphs"]
        train(compiled, steps=3, seed=1)  # three more masks
        more_graphs = counters["stats"]["unique_graphs"]
        # the branches' Dynamo settings hold only inside them: the process's own are untouched
        assert dict(torch._dynamo.config.get_config_copy()) == dynamo_config
    finally:
        torch._dynamo.reset()
    # per branch function: grad mode x whether its input requires grad (with LoRA, not before the first kept
    # branch holding a trainable parameter), shared by the 3 blocks, not one per block or mask. The adapter's
    # attention branch has two kinds of block (with and without the prompt), and one graph more for evaluation
    # with the prompt's cache set; its three steps do not meet every combination, the next three may.
    if method == "adapter":
        assert 0 < graphs <= more_graphs <= 3 * 2 * 2 + 1, (graphs, more_graphs)
    else:
        assert 0 < graphs <= 2 * 2 * 2, graphs
        assert more_graphs == graphs, "new masks compiled nothing new"


def test_compile_branches_needs_gates():
    with pytest.raises(ValueError, match="no gated block"):
        compile_branches(torch.nn.Linear(2, 2))


def test_compiled_dropped_branches_keep_no_activations_and_get_no_gradient():
    """Invariants 1-3 under --compile: the forward does not depend on the mask (to compile tolerance), parameters
    only inside dropped branches get no gradient, and dropped branches save nothing for backward."""
    from test_invariants import saved_activation_bytes

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = compile_branches(build("full", 4), backend="aot_eager", dynamic=False)  # one shape here
    handler = DropBPHandler(model)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    try:
        handler.keep_all()
        kept_logits = model(inputs).detach()
        kept_bytes = saved_activation_bytes(model, inputs, targets)
        mask = torch.tensor([True, False] * 4)  # every attention branch dropped, every MLP kept
        handler.set_mask(mask)
        torch.testing.assert_close(model(inputs), kept_logits, rtol=1e-5, atol=1e-5)
        dropped_bytes = saved_activation_bytes(model, inputs, targets)
        torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    finally:
        torch._dynamo.reset()
    for block in model.transformer.h:
        assert all(p.grad is None for p in block.attn.parameters())
        assert all(p.grad is not None for p in block.mlp.parameters())
    assert dropped_bytes < 0.7 * kept_bytes, (dropped_bytes, kept_bytes)  # eager: 0.60, compiled: 0.62
