"""Two processes on CPU (gloo) through the recipes' own `--devices 2` path: every rank draws the same drop masks
and allocates the same rates while the data shards differ, and the first optimizer step equals one process's
step on the two ranks' micro-batches with the same masks (parameters dropped everywhere get no gradient); a loss
that diverges on one rank stops both.

The cases run in the suite's one launch of two processes (tests/two_processes.py). This module holds their workers,
which record what each rank saw (`CASE/rank{0,1}.pt`), and the tests, which rebuild the step in this process.

FSDP: Lightning refuses it on CPU ("You selected the FSDP strategy but FSDP is only available on GPU"). torch's FSDP
runs on CPU with gloo when given `device_id=cpu`, so the FSDP case shards the model that way first and leaves the
rest to Lightning's FSDPStrategy (auto-wrap by Block, activation checkpointing of each Block, full state dicts).
"""

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from finetune import full, loop, lora, sensitivity_pass, trainer
from finetune import launch as launch_plan
from finetune.args import DropBPArgs

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
            # the step's last micro-batch drops every branch: only the touched weights' zero terms reduce
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

    probe_batch, compute_sensitivity, fit = loop.probe_batch, sensitivity_pass.compute_sensitivity, trainer.fit

    def recording_probe_batch(*args):
        record["probe"] = probe_batch(*args)
        return record["probe"]

    def recording_sensitivity(*args, **kwargs):
        record["sensitivity"].append(compute_sensitivity(*args, **kwargs))
        return record["sensitivity"][-1]

    def recording_fit(run, *args):
        fabric, model, optimizer, handler = run.fabric, run.model, run.optimizer, run.handler
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
        fit(run, *args)
        record.update(rates=handler.rates.clone(), allocated=handler.allocated, strategy=type(fabric.strategy).__name__)
        torch.save(record, out_dir / f"rank{fabric.global_rank}.pt")

    if case == "nan":  # rank 1 alone diverges in step 2: both ranks must stop there, neither may hang
        loss_of = loop.micro_batch_loss

        def diverging_loss(model, batch):
            loss = loss_of(model, batch)
            diverge = len(record["masks"]) == 3 and int(os.environ.get("LOCAL_RANK", 0)) == 1
            return loss * float("nan") if diverge else loss

        loop.micro_batch_loss = diverging_loss

    DropBPHandler.sample = recording_sample
    loop.CycleIterator = RecordingIterator
    loop.probe_batch, sensitivity_pass.compute_sensitivity = recording_probe_batch, recording_sensitivity
    trainer.fit = recording_fit
    if case == "fsdp":
        launch_plan.choose_strategy = lambda method, world_size, cuda: cpu_fsdp_strategy()
        # Lightning gathers full state dicts with offload_to_cpu=True, which segfaults in torch's FSDP on CPU
        full.finalize = lambda *args: None

    recipe = lora if case in ("lora", "lora_qv", "nan") else full
    extra = {"lora_dropout": 0.0} if recipe is lora else {}
    if case == "lora_qv":  # litgpt's default LoRA targets, several steps after micro-batches without backward
        extra.update(lora_key=False, lora_projection=False, lora_mlp=False)
    sensitivity = "grad" if case == "fsdp" else "auto"  # the shards' parts of "grad" add up to one process's
    allocation = "uniform" if case == "nan" else "sensitivity"
    max_steps = QV_STEPS if case == "lora_qv" else 3
    recipe.setup(
        out_dir=out_dir, devices=2, data=Builtin(num_samples=64), optimizer=SGD, seed=SEED,
        train=TrainArgs(global_batch_size=8, micro_batch_size=2, lr_warmup_steps=0, max_steps=max_steps,
                        save_interval=None if case == "fsdp" else 3, log_interval=1, min_lr=0.0, max_seq_length=64),
        eval=EvalArgs(interval=1000, max_iters=2, final_validation=False),
        dropbp=DropBPArgs(rate=0.5, sensitivity_at=0.34, sensitivity=sensitivity, allocation=allocation), **extra,
    )


# ------------------------------------------------------------------------------------- collectives per step
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor",
               "all_gather_into_tensor", "all_gather", "broadcast")  # as FSDP and Lightning call torch.distributed
GRADIENT_SIZED = 1024  # bytes: a collective of gradients or weights, not a flag or a scalar
COUNT_STEPS, COUNT_ACCUM = 4, 4


def collectives_worker(strategy: str, out_dir: Path) -> None:
    """Per optimizer step, the collectives (name, bytes) that our loop issues at p = 0 and p = 0.5, and those of a
    plain litgpt loop (no_backward_sync in all but the last micro-batch of a step) on the same model before it.
    DDP reduces from C++: its buckets are counted through its default comm hook, which calls ``dist.all_reduce``."""
    import torch.distributed as dist
    from litgpt.args import EvalArgs, TrainArgs
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from lit_gpt.data import Builtin

    torch.set_num_threads(1)
    log = []
    for name in COLLECTIVES:
        def counted(*args, _fn=getattr(dist, name), _name=name, **kwargs):
            tensors = [t for t in args if isinstance(t, torch.Tensor)]
            log.append((_name, max((t.numel() * t.element_size() for t in tensors), default=0)))
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)

    fit, counts = trainer.fit, {}

    def counting_fit(run, *args):
        fabric, method, model, optimizer, handler = run.fabric, run.method, run.model, run.optimizer, run.handler
        if strategy == "ddp":
            model._forward_module.register_comm_hook(None, allreduce_hook)  # DDP's default, through dist.all_reduce
        marks = []
        optimizer.optimizer.register_step_pre_hook(lambda *_: marks.append(len(log)))
        batches = iter(run.train_loader)
        handler.keep_all()
        for _ in range(COUNT_STEPS):  # litgpt's loop
            for k in range(COUNT_ACCUM):
                with fabric.no_backward_sync(model, enabled=k < COUNT_ACCUM - 1):
                    fabric.backward(loop.micro_batch_loss(model, next(batches)) / COUNT_ACCUM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        fit(run, *args)
        steps = [log[a:b] for a, b in zip(marks, marks[1:])]
        counts[method.name] = {"litgpt": steps[1:COUNT_STEPS - 1], "ours": steps[COUNT_STEPS:]}

    trainer.fit = counting_fit
    if strategy == "fsdp":
        launch_plan.choose_strategy = lambda method, world_size, cuda: cpu_fsdp_strategy()
        full.finalize = lambda *args: None  # see `worker`
    recipes = {"fsdp": [full], "ddp": [full, lora]}[strategy]
    result = {}
    for recipe in recipes:
        for rate in (0.0, 0.5):
            counts.clear()
            recipe.setup(
                out_dir=out_dir / f"{recipe.__name__.split('.')[-1]}-{rate}", devices=2, data=Builtin(num_samples=96),
                seed=SEED, train=TrainArgs(global_batch_size=2 * 2 * COUNT_ACCUM, micro_batch_size=2, lr_warmup_steps=0,
                                           max_steps=COUNT_STEPS + 1, save_interval=None, log_interval=2, min_lr=0.0,
                                           max_seq_length=32),
                eval=EvalArgs(interval=1000, max_iters=1, final_validation=False),
                dropbp=DropBPArgs(rate=rate, allocation="uniform"),
            )
            (name, steps), = counts.items()
            result[(name, rate)] = steps
    torch.save(result, out_dir / f"collectives{os.environ.get('LOCAL_RANK', '0')}.pt")


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


def launch(case: str, two_processes: Path) -> list:
    """The records of both ranks of a case."""
    return [torch.load(two_processes / case / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


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


def check_run(case: str, two_processes: Path) -> None:
    ranks, tmp_path = launch(case, two_processes), two_processes / case
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
            loss = loop.micro_batch_loss(model, rank["batches"][k])
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
    expected = sensitivity_pass.compute_sensitivity(
        handler, model, lambda: loop.micro_batch_loss(model, ranks[0]["probe"]), metric=metric
    )
    torch.testing.assert_close(torch.tensor([b["sensitivity"] for b in report["branches"]], dtype=torch.float64),
                               expected, rtol=1e-4, atol=1e-12)
    if case != "fsdp":
        assert torch.load(tmp_path / "step-000003" / "training_state.pth", weights_only=False)["progress"]["step"] == 3


def test_ddp_lora_ranks_agree_and_step_equals_one_process(two_processes):
    check_run("lora", two_processes)


def test_ddp_full_ranks_agree_and_step_equals_one_process(two_processes):
    check_run("full", two_processes)


def test_ddp_lora_qv_survives_micro_batches_without_backward_mid_run(two_processes):
    """The reproducer of a crash at the step after one whose last micro-batch had no backward: DDP kept the
    parameters used earlier in that step as "used" and failed on their missing gradient in the next step."""
    ranks, tmp_path = launch("lora_qv", two_processes), two_processes / "lora_qv"
    assert len(ranks[0]["masks"]) == QV_STEPS * ACCUM
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]))
    final = torch.load(tmp_path / "final" / "lit_model.pth.lora", weights_only=True)
    assert final and all("attn.qkv.lora_" in k for k in final)  # only q and v adapted
    assert all(torch.isfinite(v).all() for v in final.values())
    assert torch.load(tmp_path / "step-000003" / "training_state.pth", weights_only=False)["progress"]["step"] == 3


def test_a_loss_diverging_on_one_rank_stops_every_rank(two_processes):
    assert not (two_processes / "nan" / "rank0.pt").exists(), "the run should have stopped"
    # one error from each rank, read at the step's end (as printed: the progress bar shares stderr)
    lines = [(two_processes / "nan" / f"error-rank{r}.txt").read_text() for r in (0, 1)]
    where = [re.fullmatch(r"error: non-finite loss in step 2 \(micro-batch 3, (here|on another rank)\): stopping.*",
                          line, re.DOTALL) for line in lines]
    assert all(where), lines
    assert sorted(w.group(1) for w in where) == ["here", "on another rank"], lines


def gradient_collectives(step: list) -> list:
    return [(name, size) for name, size in step if size >= GRADIENT_SIZED]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gradient_reduction_per_step_and_no_more_at_p_above_zero(two_processes, strategy):
    """Accumulation 4 on two ranks: at p = 0 our loop issues per optimizer step exactly the gradient collectives of
    litgpt's loop (DDP: its buckets once, in the last micro-batch; FSDP: one reduce-scatter per unit, and the
    all-gathers), at p = 0.5 no more, and besides them at most one small collective per log step (the divergence
    check, log_interval 2). Before, FSDP reduce-scattered in every micro-batch: four times as many."""
    counts = torch.load(two_processes / f"collectives_{strategy}" / "collectives0.pt", weights_only=False)
    methods = {"ddp": ["full", "lora"], "fsdp": ["full"]}[strategy]
    assert sorted(counts) == sorted((m, rate) for m in methods for rate in (0.0, 0.5))
    summary = {}
    for (method, rate), steps in counts.items():
        reference = gradient_collectives(steps["litgpt"][0])
        assert reference and all(gradient_collectives(s) == reference for s in steps["litgpt"])
        kinds = {name for name, _ in reference}
        assert kinds == {"all_reduce"} if strategy == "ddp" else (
            "reduce_scatter_single" in kinds and kinds <= {"reduce_scatter_single", "all_gather_single", "all_gather"})
        for step in steps["ours"]:
            ours = gradient_collectives(step)
            if rate == 0.0:
                assert ours == reference, (method, rate)
            else:
                assert len(ours) <= len(reference) and sum(b for _, b in ours) <= sum(b for _, b in reference)
        small = [len(s) - len(gradient_collectives(s)) for s in steps["ours"]]
        assert sum(small) <= len(small) / 2, small
        summary[f"{method} p={rate}"] = (len(reference), sum(b for _, b in reference),
                                         [len(gradient_collectives(s)) for s in steps["ours"]])
    print(strategy, summary)


def test_fsdp_full_with_activation_checkpointing_ranks_agree_and_step_equals_one_process(two_processes):
    check_run("fsdp", two_processes)
