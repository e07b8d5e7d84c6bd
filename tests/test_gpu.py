"""Checks that need a CUDA GPU: `pytest -m gpu tests/test_gpu.py` (scripts/gpu_acceptance.sh runs them).

Without CUDA every test here is skipped. DROPBP_GPU_TESTS_ON_CPU=1 runs them on the CPU instead, which is how
the acceptance script's dry run checks that they work at all; only a GPU run checks what they are for (CUDA
kernels in bf16, Lightning's bitsandbytes plugin, NCCL, FSDP).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("DROPBP_GPU_TESTS_ON_CPU") == "1"
if not (CUDA or ON_CPU):  # one skip, one reason line
    pytest.skip("needs a CUDA GPU (scripts/gpu_acceptance.sh runs these)", allow_module_level=True)

from test_invariants import LAYOUTS, VARIANTS, batch, loss_of, make_pair, saved_activation_bytes  # noqa: E402

from dropbp import DropBPHandler  # noqa: E402
from lit_gpt.gated import GatedBlock  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu


def on_device(layout: str, variant: str):
    ours, theirs = make_pair(layout, variant)
    return ours.to(DEVICE, torch.bfloat16), theirs.to(DEVICE, torch.bfloat16)


def replaced_layers(ours, theirs) -> list:
    """Layers inside our model whose class is not litgpt's (e.g. a faster LoRA linear with litgpt's parameters)."""
    plain = dict(theirs.named_modules())
    return [name for name, mine in ours.named_modules()
            if name and name in plain and type(mine) is not type(plain[name]) and not isinstance(mine, GatedBlock)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gated_forward_is_bitwise_plain_litgpt_in_bf16(layout, variant):
    """Invariant 1 on the GPU's kernels, in training mode with autograd recording: under drop masks (dropped
    branches under no_grad, through the gates) the logits are bitwise those at p = 0 (litgpt's own Block.forward),
    and those are bitwise plain litgpt's wherever our layers are litgpt's (a layer we replace, such as a faster
    LoRA linear, is compared by its own tests)."""
    ours, theirs = on_device(layout, variant)
    x, y = (t.to(DEVICE) for t in batch())
    handler = DropBPHandler(ours, rate=0.5, sampling="fixed", seed=0)
    handler.keep_all()
    expected = ours(x)
    for _ in range(3):
        handler.sample()
        assert handler.mask.any() and torch.equal(ours(x), expected), f"mask {handler.mask.tolist()}"
    handler.keep_all()
    if not replaced_layers(ours, theirs):
        assert torch.equal(expected, theirs(x))
        assert torch.equal(loss_of(ours, x, y), loss_of(theirs, x, y))


def test_dropped_branches_keep_no_activations_on_gpu():
    """Invariant 3: the bytes saved for backward are the head's plus those of the kept branches only."""
    ours, _ = on_device("llama", "base")
    x, y = (t.to(DEVICE) for t in batch(t=24))
    handler = DropBPHandler(ours, sampling="fixed", seed=0)
    handler.keep_all()
    kept_all = saved_activation_bytes(ours, x, y)
    handler.set_mask(torch.ones(len(handler.gates), dtype=torch.bool))
    head_only = saved_activation_bytes(ours, x, y)
    handler.set_rates(0.5)
    handler.sample()  # fixed sampling: half of the attention and half of the MLP branches kept
    half = saved_activation_bytes(ours, x, y)
    assert head_only < 0.3 * kept_all
    assert half == head_only + (kept_all - head_only) // 2
    if CUDA:  # the allocator agrees: a forward with every branch dropped holds far less
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        handler.keep_all()
        loss = loss_of(ours, x, y)
        held_all = torch.cuda.memory_allocated() - base
        del loss
        handler.set_mask(torch.ones(len(handler.gates), dtype=torch.bool))
        loss = loss_of(ours, x, y)
        held_none = torch.cuda.memory_allocated() - base
        del loss
        assert held_none < 0.5 * held_all


def run_recipe(args: list, tmp_path: Path, driver: str = None) -> str:
    """A recipe in its own process, as a user starts it; returns its output, asserting exit status 0."""
    common = ["--out_dir", str(tmp_path), "--train.max_steps", "2", "--train.global_batch_size", "4",
              "--train.micro_batch_size", "2", "--train.lr_warmup_steps", "1", "--train.save_interval", "100",
              "--eval.interval", "100", "--eval.max_iters", "2", "--eval.max_new_tokens", "4",
              "--data", "Builtin", "--data.num_samples", "64"]
    command = [sys.executable, *(["-c", driver] if driver else []), *args, *common]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    losses = re.findall(r"Final evaluation \| val loss: ([0-9.]+)", output)
    assert losses and float(losses[-1]) < 20, output[-3000:]
    moved = re.findall(r"Trainable tensors changed by training: (\d+) of (\d+)", output)
    assert moved and int(moved[-1][0]) > 0, output[-3000:]  # exit 0 proves nothing (2 steps: not every branch kept)
    return output


def test_qlora_recipe_trains_with_bitsandbytes_nf4_in_bf16(tmp_path):
    """The QLoRA path that failed on the H200 (precision string next to the bitsandbytes plugin); its adapters must
    move (on CPUs with AVX512-BF16, QLoRA once exited 0 with every lora_B exactly zero)."""
    run_recipe(["finetune/qlora.py", "--quantize", "bnb.nf4", "--precision", "bf16-true", "--dropbp.rate", "0.5"],
               tmp_path)
    assert (tmp_path / "final" / "lit_model.pth").is_file()
    lora = torch.load(tmp_path / "final" / "lit_model.pth.lora", weights_only=True)
    moved = [bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k]
    assert sum(moved) > len(moved) / 2, moved  # p = 0.5, 4 micro-batches: a branch is never kept with chance 1/16


# Prints the strategy the recipe chose; with FORCE_TWO_DEVICE_STRATEGY=1 the recipe gets, on its one device, the
# strategy it would pick for two GPUs (FSDP with activation checkpointing for full fine-tuning), so that FSDP's
# code paths (wrapping the gated blocks, sharded saving) run on a real GPU. Not for DDP: at world size 1 the
# loop's no_backward_sync and touched branches are the ones tests/test_distributed.py runs with two processes.
STRATEGY_DRIVER = """
import os, runpy, sys
sys.path.insert(0, ".")
from finetune import launch
choose = launch.choose_strategy
def reported(method, world_size, cuda):
    if os.environ.get("FORCE_TWO_DEVICE_STRATEGY") == "1":
        world_size = 2
    strategy = choose(method, world_size, cuda)
    print("STRATEGY", strategy if isinstance(strategy, str) else type(strategy).__name__, flush=True)
    return strategy
launch.choose_strategy = reported
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("recipe, force, strategy", [("full", CUDA, "FSDPStrategy" if CUDA else "auto"),
                                                     ("lora", False, "auto")])
def test_recipe_launch_with_devices_1(tmp_path, monkeypatch, recipe, force, strategy):
    """`--devices 1` on the GPU: full fine-tuning under FSDP (two-GPU strategy on one device), LoRA as chosen."""
    monkeypatch.setenv("FORCE_TWO_DEVICE_STRATEGY", "1" if force else "0")
    output = run_recipe([f"finetune/{recipe}.py", "--devices", "1", "--precision",
                         "bf16-true" if CUDA else "32-true", "--dropbp.rate", "0.5"], tmp_path, STRATEGY_DRIVER)
    assert f"STRATEGY {strategy}" in output
    assert (tmp_path / "final" / "lit_model.pth").is_file()
