"""DropBPCallback on two processes (gloo on CPU), launched as users launch the Trainer: ``torchrun --nproc_per_node 2``.

One launch (``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_hf_distributed.py OUT``)
runs two trainings in the same two processes, and each rank writes what it saw to ``OUT/<run>.rank<r>.json`` and
``.pt``:

- ``main``: PEFT LoRA on every projection of a tiny LLaMA, p = 0.875 (Bernoulli), gradient accumulation 2, gradient
  checkpointing, DDP with ``find_unused_parameters=False`` (what the Trainer builds for a ``PreTrainedModel`` with
  gradient checkpointing), SGD with momentum and weight decay (a weight given a zero gradient instead of None would
  move), the sensitivity pass after step 1, and one forced all-dropped micro-batch (the step's reducing one).
- ``nothing``: LoRA on one layer's q_proj only, every branch dropped in every micro-batch (nothing trainable is ever
  kept), AdamW with weight decay, and the Trainer's own DDP choice for a PEFT model (``find_unused_parameters=True``).
- then a handler seeded differently on each rank, which the callback must refuse before the first step.

The test then trains ``main`` on one process in the test's own process, with the same global batch (per-device
batch 4 instead of 2 x 2 ranks), the same seed and therefore the same masks, and compares losses and final weights.

No litgpt here (this file also runs with a standalone install of dropbp and the newest transformers/peft/accelerate):
the data is synthetic, fixed-length arithmetic sequences with no padding, so each rank's mean loss over its tokens
averages exactly to the global mean.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script by torchrun

if __name__ != "__main__":
    pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
    pytest.importorskip("peft", reason="the hf extra is not installed (pip install -e '.[hf]')")

import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from dropbp import DropBPHandler  # noqa: E402
from dropbp.integrations import transformers as hf  # noqa: E402

VOCAB, SEQ, SAMPLES, LAYERS = 64, 16, 32, 4
RATE, ACCUM, STEPS, SEED = 0.875, 2, 4, 0
FORCED = {"main": {3}, "nothing": set(range(2 * ACCUM))}  # micro-batches (0-based) with every branch dropped
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------- the runs
def synthetic_data(n: int = SAMPLES) -> list:
    """Arithmetic sequences modulo VOCAB (start and stride vary): the next token is learnable from the last two."""
    g = torch.Generator().manual_seed(5)
    starts = torch.randint(0, VOCAB, (n,), generator=g)
    strides = torch.randint(1, 4, (n,), generator=g)
    seqs = (starts[:, None] + strides[:, None] * torch.arange(SEQ)) % VOCAB
    return [{"input_ids": s, "labels": s.clone()} for s in seqs]


def collate(samples: list) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "labels")}


class RecordingHandler(DropBPHandler):
    def __init__(self, *args, forced=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.masks, self.forced = [], set(forced)

    def sample(self):
        mask = super().sample()  # drawn even when forced, so the generator advances as in an unforced run
        if len(self.masks) in self.forced:
            mask = torch.ones_like(mask)
            self.set_mask(mask)
        self.masks.append(mask.tolist())
        return mask


def build(run: str, out_dir: Path, per_device_batch: int):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=SEQ, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    hf.install_gates(model)
    targets = ALL_PROJECTIONS if run == "main" else ["layers.0.self_attn.q_proj"]
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    handler = RecordingHandler(model, rate=RATE, seed=3, forced=FORCED[run])
    if run == "main":
        callback = hf.DropBPCallback(handler, sensitivity_at=0.25, probe_batch_size=4)
        extra = {"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.1, "weight_decay": 0.1,
                 "ddp_find_unused_parameters": False}
    else:
        callback = hf.DropBPCallback(handler, allocation="uniform")
        extra = {"learning_rate": 1e-2, "weight_decay": 0.1}
    args = TrainingArguments(
        output_dir=str(out_dir / run), max_steps=STEPS if run == "main" else 2,
        per_device_train_batch_size=per_device_batch, gradient_accumulation_steps=ACCUM, gradient_checkpointing=True,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=SEED, disable_tqdm=True, dataloader_num_workers=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=synthetic_data(), data_collator=collate,
                      callbacks=[callback])
    return trainer, handler, callback


def lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(run: str, out_dir: Path, per_device_batch: int) -> dict:
    """Train ``run`` and return what a rank saw (its masks, losses, the weights before and after)."""
    trainer, handler, callback = build(run, out_dir, per_device_batch)
    batches, touched, training_step = [], [], trainer.training_step

    def recording_step(model, inputs, *args, **kwargs):
        batches.append(inputs["input_ids"].tolist())
        loss = training_step(model, inputs, *args, **kwargs)
        touched.append(handler.gates[0].touch)  # as the callback's pre-hook set it for this forward and backward
        return loss

    trainer.training_step = recording_step
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {
        "masks": handler.masks,
        "rates": handler.rates.tolist(),
        "allocated": handler.allocated,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "batches": batches,
        "touched": touched,
        "world_size": trainer.args.world_size,
        "before": before,
        "after": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    }


def worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for run in ("main", "nothing"):
        record = train(run, out_dir, per_device_batch=2)
        weights = {k: record.pop(k) for k in ("before", "after")}
        (out_dir / f"{run}.rank{rank}.json").write_text(json.dumps(record))
        torch.save(weights, out_dir / f"{run}.rank{rank}.pt")
    # a handler seeded per rank would draw different masks on each: refused before the first step, on both ranks
    trainer, _, _ = build("nothing", out_dir, per_device_batch=2)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, hf.DropBPCallback))
    callback.handler = RecordingHandler(trainer.model, rate=RATE, seed=3 + rank)
    try:
        trainer.train()
        refused = ""
    except ValueError as e:
        refused = str(e)
    (out_dir / f"seeds.rank{rank}.txt").write_text(refused)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch of both runs; returns {run: [rank 0 record, rank 1 record]} with the weights in."""
    out = tmp_path_factory.mktemp("hf_ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(f"torchrun: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = {"seeds": [(out / f"seeds.rank{rank}.txt").read_text() for rank in range(2)]}
    for run in ("main", "nothing"):
        records[run] = []
        for rank in range(2):
            record = json.loads((out / f"{run}.rank{rank}.json").read_text())
            record.update(torch.load(out / f"{run}.rank{rank}.pt"))
            records[run].append(record)
    return records


def moved(record) -> list:
    return [n for n, p in record["after"].items() if not torch.equal(p, record["before"][n])]


def test_two_ranks_train_and_agree(two_ranks):
    """(a) training completes and the LoRA weights move; (b) both ranks drew the same masks (and allocated the same
    rates) while their data differed, and hold the same weights after every step's reduction."""
    r0, r1 = two_ranks["main"]
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["losses"]) == STEPS and all(torch.isfinite(torch.tensor(r0["losses"])))
    assert len(r0["masks"]) == STEPS * ACCUM and r0["masks"] == r1["masks"]
    assert r0["allocated"] and r0["rates"] == r1["rates"] and len(set(r0["rates"])) > 1  # the pass re-allocated
    assert all(m for m in r0["masks"][3]) and not all(all(m) for m in r0["masks"])  # one all-dropped, not all
    assert r0["batches"] != r1["batches"]  # each rank its own shard
    assert r0["touched"] == [False, True] * STEPS  # only where DDP reduces: the step's last micro-batch
    lora = [n for n in r0["after"] if "lora_" in n]
    assert lora and set(moved(r0)) <= set(lora) and any("lora_B" in n for n in moved(r0))
    for n in r0["after"]:
        assert torch.equal(r0["after"][n], r1["after"][n]), n


def test_nothing_trainable_kept_on_two_ranks(two_ranks):
    """(c) LoRA on one layer's attention, every branch dropped in every micro-batch: the steps complete under DDP
    (find_unused_parameters=True, the Trainer's choice for a PEFT model) and no parameter moves, not even under
    AdamW's weight decay: the touched weights' zero gradients are set back to None before the optimizer."""
    for record in two_ranks["nothing"]:
        assert len(record["masks"]) == 2 * ACCUM and all(all(m) for m in record["masks"])
        assert len(record["losses"]) == 2 and all(torch.isfinite(torch.tensor(record["losses"])))
        assert moved(record) == []


def test_handlers_seeded_per_rank_are_refused(two_ranks):
    assert all("differ across ranks" in refused for refused in two_ranks["seeds"])


def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, tmp_path, one_thread):
    """(d) One process with per-device batch 4 sees, in each micro-batch, the union of the two ranks' micro-batches
    and draws the same masks: its losses and final weights equal the two-rank run's.

    Tolerance: the two runs differ only in summation order (a batch of 4 against 2 + 2 averaged by DDP's
    all-reduce), a few float32 ulps per gradient entry; SGD is linear in the gradient, so after 4 steps the
    weights differ by about lr * steps * 1e-7 relative to the gradient's size (measured: losses 2.4e-7 apart, one
    float32 ulp at 3.9; weights 1.2e-10). 1e-5 (absolute and relative) on losses and weights leaves a wide margin
    over that and is far below a real difference: a dropped weight given a zero gradient instead of None moves by
    lr * weight_decay * |w| = 1e-2 |w| (lora_A: about 1e-3) under SGD, and its momentum keeps moving it."""
    one = train("main", tmp_path, per_device_batch=4)
    r0, r1 = two_ranks["main"]
    assert one["world_size"] == 1 and not any(one["touched"])  # one process: nothing to touch, nothing to clear
    assert one["masks"] == r0["masks"] and one["rates"] == pytest.approx(r0["rates"])
    for mine, a, b in zip(one["batches"], r0["batches"], r1["batches"]):
        assert mine == a + b  # micro-batch i of one process = rank 0's + rank 1's micro-batch i
    assert one["losses"] == pytest.approx(r0["losses"], rel=1e-5, abs=1e-5)
    assert moved(one)
    for n, p in one["after"].items():
        torch.testing.assert_close(p, r0["after"][n], rtol=1e-5, atol=1e-5, msg=n)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    # Both ranks done, the process group closed, then out without the interpreter's shutdown: there, gloo's and the
    # Trainer's threads were torn down mid-use on a loaded machine ("terminate called without an active exception",
    # rank 1 exit -6), even after a barrier and destroy_process_group. Everything the test reads is written above.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
