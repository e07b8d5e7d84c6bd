"""FSDP step checkpoints hold every trainable tensor and resume exactly: full fine-tuning on two CPU processes (gloo)
with activation checkpointing, as `finetune/full.py --devices 2` runs on GPUs. Before, the checkpoint kept only the
names without FSDP's wrappers (`wte`, `ln_f`, `lm_head`), and resuming silently restarted every block from the
pretrained weights.

The case runs in the suite's one launch of two processes (tests/two_processes.py): each rank runs the recipe
uninterrupted, then again stopped right after its step-2 save (as a kill there), then resumed with `--resume auto`,
and records the trained weights of both runs.
"""

import os
from pathlib import Path

import pytest
import torch

from tests.test_distributed import SEED, SGD, cpu_fsdp_strategy, trainable_state

STEPS, SAVE_AT = 4, 2


class Stopped(Exception):
    """Raised on every rank right after the step-2 save: the run ends there, as if killed."""


def full_state_dicts_on_the_cpu() -> None:
    """Lightning gathers full state dicts with offload_to_cpu=True, which segfaults in torch's FSDP on CPU: the same
    gather without the offload (the tensors are on the CPU already)."""
    from contextlib import contextmanager

    import lightning.fabric.strategies.fsdp as lightning_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    @contextmanager
    def full_state_dict(module, world_size, rank0_only=True):
        with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only)):
            yield

    lightning_fsdp._get_full_state_dict_context = full_state_dict


def worker(out_dir: Path) -> None:
    from litgpt.args import EvalArgs, TrainArgs

    from finetune import full, loop, trainer
    from finetune import launch as launch_plan
    from finetune.args import DropBPArgs
    from lit_gpt.data import Builtin

    torch.set_num_threads(1)
    full_state_dicts_on_the_cpu()
    launch_plan.choose_strategy = lambda method, world_size, cuda: cpu_fsdp_strategy()
    fit, save, trained = trainer.fit, loop.save_training_state, {}

    def recording_fit(run, *args):
        fit(run, *args)
        trained[run.out_dir.name] = trainable_state(run.model)

    def save_then_stop(fabric, model, optimizer, state, *args):
        path = save(fabric, model, optimizer, state, *args)
        if state["progress"]["step"] == SAVE_AT and os.environ.get("STOP_AFTER_SAVE"):
            raise Stopped
        return path

    trainer.fit, loop.save_training_state = recording_fit, save_then_stop

    def run(name: str, **kwargs) -> None:
        full.setup(
            out_dir=out_dir / name, devices=2, data=Builtin(num_samples=64), optimizer=SGD, seed=SEED,
            train=TrainArgs(global_batch_size=8, micro_batch_size=2, lr_warmup_steps=0, max_steps=STEPS,
                            save_interval=SAVE_AT, log_interval=1, min_lr=0.0, max_seq_length=64),
            eval=EvalArgs(interval=1000, max_iters=1, final_validation=False),
            dropbp=DropBPArgs(rate=0.5, allocation="uniform"), **kwargs,
        )

    run("uninterrupted")
    os.environ["STOP_AFTER_SAVE"] = "1"
    try:
        run("resumed")
        raise AssertionError("the run was not stopped after its save")
    except Stopped:
        pass
    del os.environ["STOP_AFTER_SAVE"]
    run("resumed", resume="auto")
    torch.save(trained, out_dir / f"rank{os.environ.get('LOCAL_RANK', '0')}.pt")


pytestmark = pytest.mark.usefixtures("one_thread")  # other processes take the cores


def test_fsdp_step_checkpoints_hold_every_trainable_tensor_and_resume_exactly(two_processes):
    from litgpt.config import Config

    from lit_gpt.model import GPT
    from lit_gpt.tiny_model import ensure_tiny_checkpoint

    tmp_path = two_processes / "fsdp_resume"
    names = {n for n, _ in GPT(Config.from_file(ensure_tiny_checkpoint() / "model_config.yaml")).named_parameters()}
    for run in ("uninterrupted", "resumed"):
        saved = torch.load(tmp_path / run / f"step-{SAVE_AT:06d}" / "training_state.pth", weights_only=True)
        assert saved["model"].keys() == names  # every block, not only wte, ln_f and lm_head
    resumed_from = tmp_path / "resumed" / f"step-{SAVE_AT:06d}" / "training_state.pth"
    assert f"Resumed from {resumed_from}" in (two_processes / "stdout.txt").read_text()
    for rank in (0, 1):
        trained = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected, resumed = trained["uninterrupted"], trained["resumed"]
        assert expected.keys() == resumed.keys() == names
        assert all(torch.equal(resumed[n], expected[n]) for n in names), rank
    pretrained = torch.load(ensure_tiny_checkpoint() / "lit_model.pth", weights_only=True)
    assert all(not torch.equal(expected[n], pretrained[n]) for n in names if ".h." in n)  # the blocks trained
