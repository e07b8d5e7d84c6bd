"""Every decision that differs on a GPU is made by `launch.launch_plan`. Here a GPU is pretended (monkeypatched
`torch.cuda`), for every recipe x devices 1/2 x no GPU / bf16 GPU / fp16-only GPU, and the exact arguments Fabric
would receive are checked, so no GPU-only line goes untested on a CPU."""

import inspect

import bitsandbytes  # noqa: F401 (imported for real before CUDA is pretended: its import probes the GPU)
import pytest
import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.args import EvalArgs, TrainArgs
from litgpt.model import Block

from finetune import adapter, full, lora, qlora, trainer

GPUS = {"cpu": (False, False), "bf16 gpu": (True, True), "fp16-only gpu": (True, False)}


class RecordingFabric:
    """Stands in for `lightning.Fabric`: records its arguments and what `launch` would run."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        RecordingFabric.last = self

    def launch(self, fn, *args):
        self.launched = inspect.signature(fn).bind(self, *args).arguments  # main's arguments by name


def plan(monkeypatch, tmp_path, recipe, devices, gpu, **setup_args):
    cuda, bf16 = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(trainer.L, "Fabric", RecordingFabric)
    recipe.setup(out_dir=tmp_path, devices=devices, eval=EvalArgs(),
                 train=TrainArgs(global_batch_size=8, micro_batch_size=2, max_steps=1), **setup_args)
    fabric = RecordingFabric.last
    kwargs = {k: v for k, v in fabric.kwargs.items() if k != "loggers"}
    quantize_base = fabric.launched["quantize_base"]
    return kwargs, quantize_base


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("recipe", [full, lora, qlora, adapter], ids=["full", "lora", "qlora", "adapter"])
def test_fabric_receives_the_right_arguments(monkeypatch, tmp_path, recipe, devices, gpu):
    cuda, bf16 = GPUS[gpu]
    if recipe is qlora and devices == 2:
        with pytest.raises(trainer.UsageError, match="QLoRA runs on one device"):
            plan(monkeypatch, tmp_path, recipe, devices, gpu)
        return
    kwargs, quantize_base = plan(monkeypatch, tmp_path, recipe, devices, gpu)
    strategy = kwargs.pop("strategy")
    plugins = kwargs.pop("plugins")
    default = ("bf16-true" if bf16 else "16-true") if cuda else "32-true"
    if recipe is qlora and cuda:  # Lightning's bitsandbytes plugin quantizes; a precision string would clash with it
        assert kwargs == dict(devices=1, num_nodes=1, precision=None)
        assert isinstance(plugins, BitsandbytesPrecision)
        assert plugins.dtype == (torch.bfloat16 if bf16 else torch.float16)
        assert plugins._linear_cls.__name__ == "_NF4Linear"
        assert quantize_base is None
    else:
        assert kwargs == dict(devices=devices, num_nodes=1, precision=default) and plugins is None
        assert (quantize_base is not None) == (recipe is qlora)  # CPU QLoRA: bitsandbytes' own 4-bit layers
    if devices == 1:
        assert strategy == "auto"
    elif recipe is full and cuda:
        assert isinstance(strategy, FSDPStrategy)  # sharded by block, each block recomputed in backward, as litgpt
        assert strategy._fsdp_kwargs["auto_wrap_policy"]._module_classes == {Block}
        assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
        assert strategy._fsdp_kwargs["limit_all_gathers"] and not strategy.cpu_offload.offload_params
        assert strategy._state_dict_type == "full"
    else:
        # DDP's reducer, its gradients views of its buckets (no second gradient-sized buffer)
        assert type(strategy) is DDPStrategy and strategy._ddp_kwargs == {"gradient_as_bucket_view": True}


def test_qlora_explicit_precision_on_gpu_goes_to_the_plugin(monkeypatch, tmp_path):
    """The H200 failure: `--precision bf16-true --quantize bnb.nf4` gave Fabric both a precision and the plugin."""
    kwargs, _ = plan(monkeypatch, tmp_path, qlora, 1, "bf16 gpu", precision="bf16-true", quantize="bnb.fp4-dq")
    assert kwargs["precision"] is None and kwargs["plugins"]._linear_cls.__name__ == "_FP4DQLinear"
    with pytest.raises(trainer.UsageError, match="QLoRA needs one of --precision"):
        plan(monkeypatch, tmp_path, qlora, 1, "bf16 gpu", precision="bf16-mixed")


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("recipe", [full, lora, qlora, adapter], ids=["full", "lora", "qlora", "adapter"])
def test_compile_is_handed_to_main_or_refused(monkeypatch, tmp_path, recipe, gpu):
    """--compile true reaches main on one device (QLoRA on a GPU included: Lightning's bitsandbytes plugin, no CPU
    repacking); refused for QLoRA on the CPU."""
    refused = recipe is qlora and gpu == "cpu"
    extra = {"quantize": "bnb.nf4"} if recipe is qlora else {}
    if refused:
        with pytest.raises(trainer.UsageError, match="--compile true does not work with"):
            plan(monkeypatch, tmp_path, recipe, 1, gpu, compile=True, **extra)
        return
    plan(monkeypatch, tmp_path, recipe, 1, gpu, compile=True, **extra)
    assert RecordingFabric.last.launched["opts"].compile is True
