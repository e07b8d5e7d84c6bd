"""scripts/benchmark.py (and its parts, scripts/bench_*.py) on tiny models: the tables' arithmetic, the shuffled
order, and the max-sequence search (probe processes, recovery after out-of-memory), never timings; and
scripts/random_checkpoint.py, the checkpoint of the GPU run's loop-cost step."""

import io
import json
import sys

import pytest
import torch

from scripts import bench_probe
from scripts.bench_gate_profile import profile_gates
from scripts.bench_max_seq import MaxSeqPlan, find_max_seq, search_max_seq
from scripts.bench_model import ModelSpec, build
from scripts.bench_probe import ProbeRunner, ProbeWorker
from scripts.bench_step import GIB, Step, aten_ops
from scripts.bench_tables import markdown, markdown_max_seq
from scripts.bench_time_per_sample import round_orders
from scripts.benchmark import main


def test_operator_counts_keep_the_profiler_quiet(capfd):
    """kineto prints "USDT: ... profiler_start/stop" on stderr at every profiler start and stop: hundreds of lines
    around the benchmark's table. Counting operators prints nothing, and stderr works again afterwards."""
    assert aten_ops(lambda: torch.ones(3) + 1) >= 2
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert "USDT" not in err and "after" in err


def test_time_per_sample_table(tmp_path):
    rows = main(methods=("full", "qlora"), rates=(0.0, 0.5), n_layer=2, n_embd=64, vocab_size=128, seq_len=16,
                micro_batch_size=2, steps=1, warmup=0, out=tmp_path / "bench.json")
    variants = [0.0, 0.5, "pld", "all", "plain"]
    assert [(r["method"], r["variant"]) for r in rows] == [(m, v) for m in ("full", "qlora") for v in variants]
    full = {r["variant"]: r for r in rows if r["method"] == "full"}
    assert full[0.0]["reduction"] == 0 and full[0.0]["saved_bytes_ratio"] == 1.0
    assert full["all"]["saved_bytes_ratio"] < 0.5  # every branch dropped keeps only the head's activations
    # PLD at the end of its schedule skips (1 - theta_bar)(L + 1)/(2L) of the blocks: 0.5 * 3/4 for L = 2
    assert full[0.5]["theory"] == 0.5 * 2 / 3 and full["pld"]["theory"] == full["pld"]["rate"] == 0.375
    assert full["plain"]["saved_bytes_ratio"] == 1.0  # the gates change nothing at p = 0
    assert full["plain"]["peak_gib"] == full[0.0]["peak_gib"]  # neither peak counts the other model
    assert full["plain"]["timed_rounds"] == 1 and full["plain"]["overhead"] == full["plain"]["overhead_q1"]
    assert all(r["peak_gib"] > 0 for r in rows)
    assert "| qlora | DropBP 0.5 |" in markdown(rows) and json.loads((tmp_path / "bench.json").read_text())
    # ATen operators per training step: the gates add none at p = 0; the fast QLoRA layers dispatch fewer than
    # litgpt's; every branch dropped leaves only the head's backward
    qlora = {r["variant"]: r for r in rows if r["method"] == "qlora"}
    assert full[0.0]["aten_ops"] == full["plain"]["aten_ops"] > 0
    assert qlora[0.0]["aten_ops"] < qlora["plain"]["aten_ops"]
    assert full["all"]["aten_ops"] < full[0.5]["aten_ops"] < full[0.0]["aten_ops"]


# over 30 s (40 to 150, by the state of inductor's cache): inductor compiles our branches and plain litgpt's blocks;
# fewer operators per step is inductor's own property, which Dynamo's other backends do not show. Full fine-tuning:
# half of LoRA's graphs (a branch's input always requires grad); inductor on LoRA runs in the recipe's compiled test
def test_compiled_rows_and_operator_counts(one_thread):
    """--compile true: our branch functions and plain litgpt's blocks compiled (inductor); the compiled branches
    dispatch far fewer ATen operators per step than eager."""
    import torch._dynamo

    dims = dict(methods=("full",), rates=(0.0, 0.5), n_layer=2, n_embd=64, vocab_size=128, seq_len=16,
                micro_batch_size=2, steps=1, warmup=0)
    try:
        eager = {r["variant"]: r for r in main(**dims)}
        compiled = {r["variant"]: r for r in main(**dims, compile=True)}
    finally:
        torch._dynamo.reset()
    assert all(r["compiled"] for r in compiled.values()) and not any(r["compiled"] for r in eager.values())
    for v in (0.0, 0.5, "plain"):
        assert compiled[v]["aten_ops"] < eager[v]["aten_ops"], v
    with pytest.raises(SystemExit, match="--compile true times the Table 5 rows"):
        main(methods=("qlora",), compile=True)


def test_input_gradient_floor_row():
    """--input_grad_floor true: a full model of the same shape with every weight but the embedding frozen, timed
    beside ours; its weights are left out of our model's peak."""
    dims = dict(methods=("lora",), rates=(0.0,), n_layer=2, n_embd=64, vocab_size=128, seq_len=16,
                micro_batch_size=2, steps=1, warmup=0)
    rows = {r["variant"]: r for r in main(**dims, input_grad_floor=True)}
    assert set(rows) == {0.0, "pld", "all", "plain", "frozen"}
    assert rows["frozen"]["rate"] == 0.0 and rows["frozen"]["bw_ms"] > 0 and rows["frozen"]["aten_ops"] > 0
    assert rows[0.0]["peak_gib"] == {r["variant"]: r for r in main(**dims)}[0.0]["peak_gib"]
    assert "every weight frozen (input gradients only)" in markdown(list(rows.values()))


def test_peft_beside_full_fine_tuning(capsys):
    """--beside_full true: full fine-tuning at p = 0 timed in LoRA's rounds, for paired LoRA / full ratios (the
    issue-11 targets, measured side by side in one run), with the input-gradient floor's backward over full's."""
    dims = dict(rates=(0.0,), n_layer=2, n_embd=64, vocab_size=128, seq_len=16, micro_batch_size=2, steps=3,
                warmup=0, compare_plain=False)
    rows = main(methods=("full", "lora"), **dims, input_grad_floor=True, beside_full=True)
    assert [(r["method"], r["variant"]) for r in rows if r["variant"] in ("full", "frozen")] == [
        ("full", "frozen"), ("lora", "frozen"), ("lora", "full")]  # full's own section gets no second full model
    lora = {r["variant"]: r for r in rows if r["method"] == "lora"}
    full = lora["full"]
    assert full["rate"] == 0.0 and full["aten_ops"] == next(
        r["aten_ops"] for r in rows if r["method"] == "full" and r["variant"] == 0.0)  # the same gated full model
    for key in ("fw", "bw", "total"):
        assert full[f"{key}_vs_full_q1"] <= full[f"{key}_vs_full"] <= full[f"{key}_vs_full_q3"]
    assert full["floor_bw_vs_full"] > 0
    assert lora[0.0]["peak_gib"] == {r["variant"]: r for r in main(methods=("lora",), **dims)}[0.0]["peak_gib"]
    out = capsys.readouterr().out
    assert "times in ms per sample: a step of micro-batch 2 takes 2x them" in out  # not per step (issue 31)
    assert "full fine-tuning (gated), p=0" in out
    assert "lora vs full fine-tuning (both gated, p=0): FW " in out and "input-gradient floor BW" in out
    with pytest.raises(SystemExit, match="--beside_full time the Table 5 rows"):
        main(methods=("lora",), beside_full=True, profile=True)


def test_variant_order_is_shuffled_every_round_and_seeded():
    variants = [0.0, 0.5, 0.75, 0.875, "pld", "all", "plain"]
    orders = round_orders(variants, 9)
    assert all(sorted(map(str, o)) == sorted(map(str, variants)) for o in orders)
    assert len({o[0] for o in orders}) > 1 and len({o[-1] for o in orders}) > 1
    assert orders == round_orders(variants, 9) != round_orders(variants, 9, seed=1)


def test_adamw_moments_exist_before_the_first_step_and_weights_are_untouched():
    model = build(ModelSpec("full", None, dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = Step(model, "cpu", optimizer_step=True)
    for p in step.trainable:
        assert p.grad is None and set(step.optimizer.state[p]) >= {"exp_avg", "exp_avg_sq"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------- max-length search
class PoisonedAfterOOM:
    """A probe process as the H200 showed it: a length fits below a threshold, and after the first
    out-of-memory every later probe in the same process fails too."""

    def __init__(self, threshold: dict, log: list) -> None:
        self.threshold, self.log, self.poisoned = threshold, log, False
        log.append("start")

    def probe(self, rate, seq_len):
        fits = not self.poisoned and seq_len <= self.threshold[rate]
        self.poisoned |= not fits
        self.log.append((rate, seq_len, fits))
        return {"fits": fits, "oom": not fits, "peak_bytes": seq_len * 1000 if fits else None,
                "cap_bytes": self.threshold[rate] * 1000 + 999, "seconds": 0.0}

    def close(self):
        self.log.append("close")


def test_max_seq_search_is_exact_although_a_process_fails_after_out_of_memory(monkeypatch):
    threshold = {0.0: 1300, 0.5: 2900, 0.875: 9000}
    log = []
    monkeypatch.setattr(ProbeRunner, "start_worker", lambda self: PoisonedAfterOOM(threshold, log))
    rows = find_max_seq(ModelSpec("full"), MaxSeqPlan([0.0, 0.5, 0.875], micro_batch_size=1, start=256, limit=16384,
                                                      probe_steps=1, granularity=256))
    assert [r["max_seq_len"] for r in rows] == [1280, 2816, 8960]  # exact: the largest multiple of 256 that fits
    for r in rows:
        assert r["first_failure"] == r["max_seq_len"] + 256 and not r["limit_reached"]
        for p in r["probes"]:  # every probe counted: a length fits exactly when it is below the threshold
            assert p["fits"] == (p["seq_len"] <= threshold[r["rate"]])
    # every out-of-memory retired its process: the next probe always ran in a new one
    probes = [e for e in log if isinstance(e, tuple)]
    assert log.count("start") == 1 + sum(not fits for *_, fits in probes[:-1])
    assert log.count("close") == log.count("start")
    # in one process (the old behaviour) the same search is wrong: everything after the first OOM fails
    poisoned = PoisonedAfterOOM(threshold, [])
    wrong = search_max_seq(lambda n: poisoned.probe(0.0, n), 256, 16384, 256, log=lambda line: None)
    assert wrong["max_seq_len"] < 1280


def test_a_probe_process_that_crashes_ends_only_its_rate(monkeypatch):
    class CrashesAtHalf(PoisonedAfterOOM):
        def probe(self, rate, seq_len):
            if rate == 0.5:
                raise RuntimeError("the probe process exited with status -11 without an answer")
            return super().probe(rate, seq_len)

    log = []
    monkeypatch.setattr(ProbeRunner, "start_worker", lambda self: CrashesAtHalf({0.0: 1300, 0.875: 5000}, log))
    rows = find_max_seq(ModelSpec("full"), MaxSeqPlan([0.0, 0.5, 0.875], micro_batch_size=1, start=256, limit=16384,
                                                      probe_steps=1, granularity=256))
    assert [r["max_seq_len"] for r in rows] == [1280, None, 4864] and "status -11" in rows[1]["error"]
    assert "failed" in markdown_max_seq(rows)


def test_fresh_process_per_probe(monkeypatch):
    log = []
    monkeypatch.setattr(ProbeRunner, "start_worker", lambda self: PoisonedAfterOOM({0.0: 1000}, log))
    runner = ProbeRunner({}, fresh_process_per_probe=True)
    assert [runner(0.0, n)["process"] for n in (256, 512, 768)] == [1, 2, 3]
    assert log.count("start") == log.count("close") == 3


def test_search_limits_and_a_start_that_does_not_fit():
    quiet = dict(log=lambda line: None)
    fits_below = lambda t: lambda n: {"fits": n <= t, "oom": n > t}  # noqa: E731
    assert search_max_seq(fits_below(10**6), 512, 3000, 256, **quiet)["max_seq_len"] == 3000  # the limit is probed
    assert search_max_seq(fits_below(10**6), 512, 3000, 256, **quiet)["limit_reached"]
    assert search_max_seq(fits_below(2999), 512, 3000, 256, **quiet)["max_seq_len"] == 2816
    assert search_max_seq(fits_below(100), 512, 3000, 256, **quiet)["max_seq_len"] == 0
    assert search_max_seq(fits_below(300), 512, 3000, 256, **quiet)["max_seq_len"] == 256


def test_probe_worker_stops_answering_after_out_of_memory(monkeypatch, capsys):
    class FakeState:
        cap_bytes = None

        def __init__(self, spec):
            pass

        def probe(self, rate, seq_len):
            if seq_len > 100:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return {"fits": True, "oom": False, "peak_bytes": seq_len}

    monkeypatch.setattr(bench_probe, "ProbeState", FakeState)
    requests = "".join(json.dumps({"rate": 0.0, "seq_len": n}) + "\n" for n in (64, 128, 32))
    monkeypatch.setattr(sys, "stdin", io.StringIO(requests))
    bench_probe.probe_worker({"device": "cpu"})
    answers = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()]
    assert [(a["fits"], a["oom"]) for a in answers] == [(True, False), (False, True)]  # no answer after the OOM


def test_a_killed_probe_process_is_out_of_memory_and_a_crash_is_an_error():
    killed = ProbeWorker({}, argv=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.probe(0.0, 512)["oom"]
    killed.close()
    crashed = ProbeWorker({}, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with status 3"):
        crashed.probe(0.0, 512)
    crashed.close()


def test_max_seq_search_in_a_probe_process_under_a_memory_budget(one_thread):
    """The real thing on CPU: probes in a probe process, doubling then a guided bisection against a budget."""
    budget = 0.004
    rows = main(methods=("full",), rates=(0.0, 0.875), n_layer=4, n_embd=64, vocab_size=128, micro_batch_size=1,
                find_max_seq_len=True, memory_budget=budget, max_seq_start=32, max_seq_limit=2048, probe_steps=1,
                granularity=32)
    p0, p875 = rows
    assert 32 <= p0["max_seq_len"] < p875["max_seq_len"] < 2048
    for r in rows:
        assert r["max_seq_len"] % 32 == 0 and r["first_failure"] == r["max_seq_len"] + 32  # exact to 32 tokens
        assert all(p["peak_bytes"] <= budget * GIB for p in r["probes"] if p["fits"])
        assert all(p["process"] == 1 for p in r["probes"])  # over a budget is no out-of-memory: one process
    assert "| full | 0.875 | fixed |" in markdown_max_seq(rows)


def test_gated_block_at_p0_dispatches_exactly_litgpt_ops_with_little_python():
    """The p = 0 fast path: litgpt's own Block.forward, so the same ATen ops, and three Python calls more per block
    (GatedBlock.forward and one check per gate) instead of the gates, closures and additions."""
    r = profile_gates("full", dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64), seq_len=8, micro_batch_size=1,
                      rounds=1, calls=2)
    assert r["same_aten_ops"] and r["aten_ops"] > 0
    assert r["python_calls_gated"] - r["python_calls_plain"] <= 3


def test_random_checkpoint_defaults_to_the_gpu_only_when_there_is_one(tmp_path, monkeypatch):
    from scripts import random_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert random_checkpoint.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no --device on a CPU machine: no traceback
    out = random_checkpoint.main(out_dir=tmp_path / "random", n_layer=1, n_embd=64, n_head=4, vocab_size=1024,
                                 seq_len=16, num_samples=2)
    assert (out / "lit_model.pth").is_file() and len(json.loads((out / "long_samples.json").read_text())) == 2


def test_profile_recipe_times_the_steps_and_profiles_those_after_the_skipped_ones(tmp_path):
    """scripts/profile_recipe.py (issue 31): the recipe's own run, each phase timed per call, the sensitivity pass
    (between steps) left out of the times, and the operator table of the profiled steps."""
    from scripts import profile_recipe

    args = ["--data", "Builtin", "--data.num_samples", "32", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.max_seq_length", "32", "--eval.interval", "1000",
            "--eval.initial_validation", "false", "--eval.final_validation", "false", "--eval.max_new_tokens", "0",
            "--dropbp.rate", "0.5", "--dropbp.sensitivity_at", "0.2"]
    result = profile_recipe.main("lora", [*args, "--train.max_steps", "5", "--out_dir", str(tmp_path / "a")],
                                 skip=3, active=2)
    assert result["steps"] == 5 and result["calls"]["forward+loss"] == 10  # the sensitivity pass's are not counted
    assert (tmp_path / "a" / "dropbp_allocation.json").is_file()  # it ran
    assert all(s > 0 for s in result["medians"].values())
    for name in ("## forward+loss", "## backward", "## optimizer", "aten::mm"):
        assert name in result["table"], name
    with pytest.raises(SystemExit, match="the run ended before 5 steps: raise its --train.max_steps"):
        profile_recipe.main("lora", [*args, "--train.max_steps", "2", "--out_dir", str(tmp_path / "b")],
                            skip=3, active=2)
