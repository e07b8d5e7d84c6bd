"""Two processes on CPU (gloo) through the recipes' own `--devices 2` path: every rank draws the same drop masks
and allocates the same rates while the data shards differ, and the first optimizer step equals one process's
step on the two ranks' micro-batches with the same masks (parameters dropped everywhere get no gradient); a loss
that diverges on one rank stops both.

Each case runs `python tests/test_distributed.py CASE OUT_DIR`; Fabric's launcher runs this file again for rank 1.
The worker records what each rank saw (`OUT_DIR/rank{0,1}.pt`) and the test rebuilds the step in this process.

FSDP: Lightning refuses it on CPU ("You selected the FSDP strategy but FSDP is only available on GPU"). torch's FSDP
runs on CPU with gloo when given `device_id=cpu`, so the FSDP case shards the model that way first and leaves the
rest to Lightning's FSDPStrategy (auto-wrap by Block, activation checkpointing of each Block, full state dicts).
"""

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script for the worker processes

from finetune import full, lora, trainer  # noqa: E402
from finetune.args import DropBPArgs  # noqa: E402

SEED = 1337
LR = 0.01
ACCUM = 2  # global batch 8 = micro-batch 2 x 2 ranks x 2 micro-batches
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": LR, "momentum": 0.9}}  # step 1: p -= lr * grad
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # inserted into parameter names by FSDP
QV_STEPS = 5
QV_NOTHING_TRAINABLE = (3, 4, 7)  # micro-batches (0-based) with nothing trainable kept: last of step 2, first of 3, ...


# ----------------------------------------------------------------------------------------- worker processes
def worker(case: str, out_dir: Path) -> None:
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.utils import CycleIterator

    from dropbp import DropBPHandler
    from lit_gpt.data import Builtin

    torch.set_num_threads(1)
    record = {"masks": [], "batches": [], "sensitivity": []}

    sample = DropBPHandler.sample

    def recording_sample(handler):
        mask = sample(handler)
        if case == "lora" and len(record["masks"]) == 1:
            # the step's last micro-batch drops every branch: backward is skipped, gradients are averaged by hand
            mask = torch.ones_like(mask)
            handler.set_mask(mask)
        if case == "lora_qv" and len(record["masks"]) in QV_NOTHING_TRAINABLE:
            # LoRA on q and v only: keep just the MLP branches, so the loss has no graph (no backward)
            mask = torch.tensor([g.kind == "attn" for g in handler.gates])
            handler.set_mask(mask)
        record["masks"].append(mask.clone())
        return mask

    class RecordingIterator(CycleIterator):
        def __next__(self):
            batch = super().__next__()
            record["batches"].append({k: batch[k].clone() for k in ("input_ids", "labels")})
            return batch

    probe_batch, compute_sensitivity, fit = trainer.probe_batch, trainer.compute_sensitivity, trainer.fit

    def recording_probe_batch(*args):
        record["probe"] = probe_batch(*args)
        return record["probe"]

    def recording_sensitivity(*args, **kwargs):
        record["sensitivity"].append(compute_sensitivity(*args, **kwargs))
        return record["sensitivity"][-1]

    def recording_fit(fabric, method, model, optimizer, handler, *args):
        record["init"] = trainable_state(model)
        record["checkpointed"] = sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules())

        def before_step(*_):
            if "with_grad" not in record:
                record["with_grad"] = {strip(n) for n, p in model.module.named_parameters() if p.grad is not None}

        def after_step(*_):
            if "after" not in record:
                record["after"] = trainable_state(model)

        optimizer.optimizer.register_step_pre_hook(before_step)
        optimizer.optimizer.register_step_post_hook(after_step)
        fit(fabric, method, model, optimizer, handler, *args)
        record.update(rates=handler.rates.clone(), allocated=handler.allocated, strategy=type(fabric.strategy).__name__)
        torch.save(record, out_dir / f"rank{fabric.global_rank}.pt")

    if case == "nan":  # rank 1 alone diverges in step 2: both ranks must stop there, neither may hang
        loss_of = trainer.micro_batch_loss

        def diverging_loss(model, batch):
            loss = loss_of(model, batch)
            diverge = len(record["masks"]) == 3 and int(os.environ.get("LOCAL_RANK", 0)) == 1
            return loss * float("nan") if diverge else loss

        trainer.micro_batch_loss = diverging_loss

    DropBPHandler.sample = recording_sample
    trainer.CycleIterator = RecordingIterator
    trainer.probe_batch, trainer.compute_sensitivity = recording_probe_batch, recording_sensitivity
    trainer.fit = recording_fit
    if case == "fsdp":
        trainer.choose_strategy = lambda method, world_size, cuda: cpu_fsdp_strategy()
        # Lightning gathers full state dicts with offload_to_cpu=True, which segfaults in torch's FSDP on CPU
        full.finalize = lambda *args: None

    recipe = lora if case in ("lora", "lora_qv", "nan") else full
    extra = {"lora_dropout": 0.0} if recipe is lora else {}
    if case == "lora_qv":  # litgpt's default LoRA targets, several steps after micro-batches without backward
        extra.update(lora_key=False, lora_projection=False, lora_mlp=False)
    sensitivity = "grad" if case == "fsdp" else "auto"  # the shards' parts of "grad" add up to one process's
    allocation = "uniform" if case == "nan" else "sensitivity"
    max_steps = QV_STEPS if case == "lora_qv" else 3
    try:
        recipe.setup(
            out_dir=out_dir, devices=2, data=Builtin(num_samples=64), optimizer=SGD, seed=SEED,
            train=TrainArgs(global_batch_size=8, micro_batch_size=2, lr_warmup_steps=0, max_steps=max_steps,
                            save_interval=None if case == "fsdp" else 3, log_interval=1, min_lr=0.0, max_seq_length=64),
            eval=EvalArgs(interval=1000, max_iters=2, final_validation=False),
            dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.34, sensitivity=sensitivity, allocation=allocation), **extra,
        )
    except trainer.UsageError as e:  # as the CLI reports it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def cpu_fsdp_strategy():
    from lightning.fabric.strategies import FSDPStrategy
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        """Shards with the arguments Lightning would pass, but on the CPU; Lightning then sees a wrapped model and
        only adds activation checkpointing."""

        def setup_module(self, module):
            module = FullyShardedDataParallel(
                module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self._fsdp_kwargs,
            )
            return super().setup_module(module)

    return CPUFSDPStrategy(
        auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, state_dict_type="full", cpu_offload=False
    )


def strip(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def trainable_state(model) -> dict:
    """Full (unsharded) copies of the trainable parameters, by their plain litgpt names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = isinstance(model._forward_module, FullyShardedDataParallel)
    with FullyShardedDataParallel.summon_full_params(model._forward_module) if sharded else nullcontext():
        return {strip(n): p.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- the tests
pytestmark = pytest.mark.usefixtures("one_thread")  # other processes take the cores


def launch(case: str, out_dir: Path) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, case, str(out_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def reference_model(case: str):
    """One process, built the way `trainer.main` builds it (same seed, so the same LoRA initialisation)."""
    from dropbp import DropBPHandler
    from lit_gpt.tiny_model import ensure_tiny_checkpoint

    checkpoint_dir = ensure_tiny_checkpoint()
    torch.manual_seed(SEED)
    if case == "lora":
        from lit_gpt.lora import GPT, mark_only_lora_as_trainable

        targets = dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True)
        model = GPT(lora.lora_config(checkpoint_dir, 8, 16, 0.0, targets))
        mark_only_lora_as_trainable(model)
    else:
        from litgpt.config import Config

        from lit_gpt.model import GPT

        model = GPT(Config.from_file(checkpoint_dir / "model_config.yaml"))
    state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    model.load_state_dict(state, strict=False)
    model.max_seq_length = 64
    return model, DropBPHandler(model)


def check_run(case: str, tmp_path: Path) -> None:
    ranks = launch(case, tmp_path)
    assert [r["strategy"] for r in ranks] == (["CPUFSDPStrategy"] * 2 if case == "fsdp" else ["DDPStrategy"] * 2)
    assert ranks[0]["checkpointed"] == (8 if case == "fsdp" else 0)  # FSDP: every block recomputed in backward

    # same masks on every rank (several steps, across the re-allocation), different data
    assert len(ranks[0]["masks"]) == 3 * ACCUM
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]))
    for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert not torch.equal(a["input_ids"], b["input_ids"])
    # one allocation everywhere, written by rank 0
    if case != "fsdp":  # DDP averaged the probe gradients: the same sensitivities before any broadcast
        assert torch.equal(ranks[0]["sensitivity"][0], ranks[1]["sensitivity"][0])
    assert ranks[0]["allocated"] and ranks[1]["allocated"]
    assert torch.equal(ranks[0]["rates"], ranks[1]["rates"])
    report = json.loads((tmp_path / "dropbp_allocation.json").read_text())
    assert [b["rate"] for b in report["branches"]] == ranks[0]["rates"].tolist()
    assert len(set(ranks[0]["rates"].tolist())) > 1  # re-allocated, not the uniform 0.5

    # the first step: one process on both ranks' micro-batches, with the same masks
    model, handler = reference_model(case)
    params = dict(model.named_parameters())
    for name, value in ranks[0]["init"].items():
        assert torch.equal(params[name], value), name  # LoRA initialised as on one device, checkpoint loaded
        assert torch.equal(ranks[1]["init"][name], value), name
    for k in range(ACCUM):
        handler.set_mask(ranks[0]["masks"][k])
        for rank in ranks:
            loss = trainer.micro_batch_loss(model, rank["batches"][k])
            if loss.requires_grad:  # every branch dropped in LoRA: no backward
                (loss / (ACCUM * 2)).backward()
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert ranks[0]["with_grad"] | ranks[1]["with_grad"] == with_grad
    dropped_everywhere = set(ranks[0]["init"]) - with_grad
    assert dropped_everywhere, "the masks should leave some parameters without gradient"
    for name, before in ranks[0]["init"].items():
        after = ranks[0]["after"][name]
        assert torch.equal(ranks[1]["after"][name], after), name
        if name in dropped_everywhere:
            assert torch.equal(after, before), name  # no gradient: SGD (and its momentum) left it alone
        else:
            ulp = torch.finfo(before.dtype).eps * before.abs().max()  # norm weights are ~1: their steps are coarse
            torch.testing.assert_close(after - before, -LR * params[name].grad, rtol=1e-3, atol=2 * ulp)

    # the sensitivity pass: the same as one process's on the parameters after step 1
    model.load_state_dict(ranks[0]["after"], strict=False)
    model.zero_grad(set_to_none=True)
    metric = "gradnorm" if case == "full" else "grad"
    expected = trainer.compute_sensitivity(
        handler, model, lambda: trainer.micro_batch_loss(model, ranks[0]["probe"]), metric=metric
    )
    torch.testing.assert_close(torch.tensor([b["sensitivity"] for b in report["branches"]], dtype=torch.float64),
                               expected, rtol=1e-4, atol=1e-12)
    if case != "fsdp":
        assert torch.load(tmp_path / "step-000003" / "training_state.pth", weights_only=False)["progress"]["step"] == 3


def test_ddp_lora_ranks_agree_and_step_equals_one_process(tmp_path):
    check_run("lora", tmp_path)


def test_ddp_full_ranks_agree_and_step_equals_one_process(tmp_path):
    check_run("full", tmp_path)


def test_ddp_lora_qv_survives_micro_batches_without_backward_mid_run(tmp_path):
    """The reproducer of a crash at the step after one whose last micro-batch had no backward: DDP kept the
    parameters used earlier in that step as "used" and failed on their missing gradient in the next step."""
    ranks = launch("lora_qv", tmp_path)
    assert len(ranks[0]["masks"]) == QV_STEPS * ACCUM
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]))
    final = torch.load(tmp_path / "final" / "lit_model.pth.lora", weights_only=True)
    assert final and all("attn.qkv.lora_" in k for k in final)  # only q and v adapted
    assert all(torch.isfinite(v).all() for v in final.values())
    assert torch.load(tmp_path / "step-000003" / "training_state.pth", weights_only=False)["progress"]["step"] == 3


def test_a_loss_diverging_on_one_rank_stops_every_rank(tmp_path):
    proc = subprocess.run([sys.executable, __file__, "nan", str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # one error from each rank (the progress bar shares stderr, hence no line anchors); rank 0's own loss is finite
    losses = re.findall(r"error: non-finite loss in step 2 \(micro-batch 3, loss (\S+) here\): stopping", proc.stderr)
    assert len(losses) == 2 and losses.count("nan") == 1, proc.stderr[-3000:]


class ThreadRanks:
    """Ranks as threads of this process, with a Fabric-like ``all_reduce`` that waits for every rank, refuses
    mismatched collectives (as gloo aborts and NCCL hangs or mixes elements) and logs each rank's calls."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.sent = [None] * world_size
        self.calls = [[] for _ in range(world_size)]

    def fabric(self, rank: int):
        ranks = self

        class Fabric:
            world_size, global_rank = ranks.world_size, rank

            def all_reduce(self, t, reduce_op="mean"):
                ranks.calls[rank].append((t.dtype, t.numel()))
                ranks.sent[rank] = t.clone()
                ranks.barrier.wait()
                parts = list(ranks.sent)
                ranks.barrier.wait()
                if len({(p.dtype, p.shape) for p in parts}) > 1:
                    raise RuntimeError(f"mismatched collective: {[(p.dtype, tuple(p.shape)) for p in parts]}")
                stacked = torch.stack(parts)
                return stacked.mean(0) if reduce_op == "mean" else stacked.amax(0)

        return Fabric()

    def run(self, fn, *per_rank_args) -> list:
        with ThreadPoolExecutor(self.world_size) as pool:
            futures = [pool.submit(fn, self.fabric(r), *args) for r, args in enumerate(per_rank_args)]
            return [f.result() for f in futures]


def test_average_gradients_when_ranks_hold_gradients_for_different_parameters():
    """A parameter with a gradient on one rank only (a MoE expert no token of the other rank's batch reached) is
    averaged with zeros there; one without gradient anywhere (a dropped branch) stays None; the collectives are
    issued per dtype in the order of first appearance (a set's order differs between processes)."""

    def ranks_params(rank):
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
                  torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(5))]
        params[0].grad = torch.full((3,), 1.0 + rank)
        params[1].grad = torch.full((2,), 2.0 * (rank + 1), dtype=torch.bfloat16)
        if rank == 0:
            params[2].grad = torch.full((4,), 4.0)  # routed on rank 0 only; params[3]: nowhere
        return params

    for order in ([0, 1, 2, 3], [1, 3, 2, 0]):
        ranks = ThreadRanks()
        params = [[ranks_params(r)[i] for i in order] for r in range(2)]
        ranks.run(trainer.average_gradients, *[(p,) for p in params])
        assert ranks.calls[0] == ranks.calls[1]
        dtypes = [dtype for dtype, _ in ranks.calls[0][1:]]  # after the which-parameters-hold-gradients call
        assert dtypes == list(dict.fromkeys(p.dtype for p in params[0] if p.numel() != 5))
        for rank_params in params:
            by_size = {p.numel(): p.grad for p in rank_params}
            assert torch.equal(by_size[3], torch.full((3,), 1.5)) and torch.equal(by_size[4], torch.full((4,), 2.0))
            assert torch.equal(by_size[2], torch.full((2,), 3.0, dtype=torch.bfloat16)) and by_size[5] is None


def test_fsdp_full_with_activation_checkpointing_ranks_agree_and_step_equals_one_process(tmp_path):
    check_run("fsdp", tmp_path)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
