"""The model-agnostic core on a plain PyTorch residual model: sampling (invariants 4, 5), allocation, PLD,
learning-rate compensation, state and bad arguments."""

import math

import pytest
import torch
from torch import nn

from dropbp import DropBPGate, add_branch, DropBPHandler, PLDHandler, allocate_rates, branch_flops, compute_sensitivity


class ResidualMLP(nn.Module):
    """Any PyTorch model adopts DropBP by calling its residual branches through gates."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.gates = nn.ModuleList(
            DropBPGate("attn" if i % 2 == 0 else "mlp", i // 2, 1.0 + i, (b,)) for i, b in enumerate(self.branches)
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        x = self.inp(x)
        for gate, branch in zip(self.gates, self.branches):
            x = add_branch(gate(branch, x), x)
        return self.out(x).sum()


def test_masks_come_from_own_generator_and_match_across_handlers():
    """Invariant 4: same seed -> same masks (stand-in for two ranks); the global RNG is not touched."""
    a = DropBPHandler(ResidualMLP(depth=16), rate=0.5, seed=7)
    b = DropBPHandler(ResidualMLP(depth=16), rate=0.5, seed=7)
    c = DropBPHandler(ResidualMLP(depth=16), rate=0.5, seed=8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    masks_a = [a.sample() for _ in range(20)]
    assert torch.equal(torch.get_rng_state(), before)
    masks_b = [b.sample() for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))
    assert any(not torch.equal(x, c.sample()) for x in masks_a)
    assert [g.dropped for g in a.gates] == masks_a[-1].tolist()


@pytest.mark.parametrize("sampling", ["bernoulli", "fixed"])
def test_marginals(sampling):
    """Invariant 5: over many steps gate i is dropped with frequency p_i (4 sigma, fixed seed)."""
    rates = [0.0, 0.1, 0.3, 0.5, 0.5, 0.7, 0.875, 0.9]
    handler = DropBPHandler(ResidualMLP(depth=8), rate=rates, sampling=sampling, seed=0)
    n = 4000
    freq = torch.stack([handler.sample() for _ in range(n)]).double().mean(0)
    for f, p in zip(freq.tolist(), rates):
        assert abs(f - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (f, p)


def test_fixed_budget_keeps_the_planned_count_every_step():
    handler = DropBPHandler(ResidualMLP(depth=16), rate=0.875, sampling="fixed", seed=0)  # 8 attn + 8 mlp
    attn = [i for i, g in enumerate(handler.gates) if g.kind == "attn"]
    for _ in range(500):
        kept = ~handler.sample()
        assert int(kept[attn].sum()) == 1 and int(kept.sum()) == 2
    # non-uniform rates: the count per kind is the floor or ceil of sum(1 - p_i)
    handler.set_rates([0.2, 0.5, 0.6, 0.9] * 4)  # attn keeps 4 * (0.8 + 0.4) = 4.8, mlp 4 * (0.5 + 0.1) = 2.4
    mlp = [i for i, g in enumerate(handler.gates) if g.kind == "mlp"]
    masks = [~handler.sample() for _ in range(500)]
    assert {int(k[attn].sum()) for k in masks} == {4, 5} and {int(k[mlp].sum()) for k in masks} == {2, 3}


def test_realised_rate_and_all_dropped():
    model = ResidualMLP(depth=4)
    handler = DropBPHandler(model, rate=0.5)
    handler.set_mask(torch.tensor([True, True, False, False]))
    assert handler.realised_rate == pytest.approx((1 + 2) / (1 + 2 + 3 + 4))
    assert not handler.all_dropped
    handler.set_mask(torch.ones(4, dtype=torch.bool))
    assert handler.all_dropped
    # every branch dropped: the input layer still gets its gradient through the residual path
    model(torch.randn(3, 8)).backward()
    assert model.inp.weight.grad is not None and all(b[0].weight.grad is None for b in model.branches)


def test_state_dict_round_trip_resumes_the_same_masks():
    handler = DropBPHandler(ResidualMLP(depth=8), rate=0.5, sampling="fixed", seed=3)
    handler.set_rates([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    handler.allocated = True
    handler.sample()
    state = handler.state_dict()
    expected = [handler.sample() for _ in range(5)]
    other = DropBPHandler(ResidualMLP(depth=8), rate=0.0, sampling="bernoulli", seed=0)
    other.load_state_dict(state)
    assert other.allocated and other.sampling == "fixed" and torch.allclose(other.rates, handler.rates)
    assert all(torch.equal(e, other.sample()) for e in expected)


def test_sensitivity_restores_rng_and_probe_sees_the_same_dropout():
    net = ResidualMLP(depth=2)  # a gated model whose branch uses dropout
    net.branches[0].append(nn.Dropout(0.5))
    handler = DropBPHandler(net)
    x = torch.randn(4, 8)
    s = compute_sensitivity(handler, net, lambda: net(x))
    again = compute_sensitivity(handler, net, lambda: net(x))
    assert torch.equal(s, again), "each probe must restart from the same RNG state"


def test_bad_arguments_raise_one_clear_error():
    model = ResidualMLP()
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"drop rate must be in \[0, 1\)"):
            DropBPHandler(model, rate=rate)
    with pytest.raises(ValueError, match="unknown sampling mode 'topk'"):
        DropBPHandler(model, sampling="topk")
    with pytest.raises(ValueError, match="got 2 drop rates for 4 gates"):
        DropBPHandler(model, rate=[0.1, 0.2])
    with pytest.raises(ValueError, match="has no DropBPGate"):
        DropBPHandler(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_rates([1, 2, 3], [1, 1, 1], target=0.95, max_rate=0.9)
    with pytest.raises(ValueError, match="unknown sensitivity metric"):
        compute_sensitivity(DropBPHandler(model), model, lambda: model(torch.randn(1, 8)), metric="fisher")
    with pytest.raises(ValueError, match="theta_bar"):
        PLDHandler(model, theta_bar=0.0)


def test_branch_flops_attention_grows_quadratically():
    from litgpt.config import Config

    config = Config.from_name("Llama-2-7b-hf")
    f512, f4k = branch_flops(config, 512), branch_flops(config, 4096)
    assert len(f512) == 64
    d, inter = config.n_embd, config.intermediate_size
    assert f512[1] == 2 * 512 * d * inter * 3
    assert f512[0] == 2 * 512 * d * 3 * d + 4 * 512**2 * d + 2 * 512 * d * d
    assert f4k[1] / f512[1] == 8 and f4k[0] / f512[0] > 8
