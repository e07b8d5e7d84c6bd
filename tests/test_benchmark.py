"""scripts/benchmark.py on tiny models: the tables' arithmetic and the max-sequence search, never timings."""

from scripts.benchmark import main, markdown, markdown_max_seq


def test_time_per_sample_table(tmp_path):
    rows = main(methods=("full", "qlora"), rates=(0.0, 0.5), n_layer=2, n_embd=64, vocab_size=128, seq_len=16,
                micro_batch_size=2, steps=1, warmup=0, out=tmp_path / "bench.json")
    variants = [0.0, 0.5, "pld", "all", "plain"]
    assert [(r["method"], r["variant"]) for r in rows] == [(m, v) for m in ("full", "qlora") for v in variants]
    full = {r["variant"]: r for r in rows if r["method"] == "full"}
    assert full[0.0]["reduction"] == 0 and full[0.0]["saved_bytes_ratio"] == 1.0
    assert full["all"]["saved_bytes_ratio"] < 0.5  # every branch dropped keeps only the head's activations
    assert full[0.5]["theory"] == 0.5 * 2 / 3 and full["pld"]["theory"] == 0.25
    assert full["plain"]["saved_bytes_ratio"] == 1.0  # the gates change nothing at p = 0
    assert all(r["peak_gib"] > 0 for r in rows)
    assert "| qlora | DropBP 0.5 |" in markdown(rows) and (tmp_path / "bench.json").is_file()


def test_max_seq_search_under_a_memory_budget():
    """Doubling then bisection against a CPU memory budget: dropping more fits longer sequences."""
    rows = main(methods=("full",), rates=(0.0, 0.875), n_layer=4, n_embd=64, vocab_size=128, micro_batch_size=1,
                find_max_seq_len=True, memory_budget=0.004, max_seq_start=32, max_seq_limit=2048, probe_steps=2,
                granularity=32)
    p0, p875 = rows
    assert 32 <= p0["max_seq_len"] < p875["max_seq_len"] <= 2048
    assert p0["max_seq_len"] % 32 == 0 and not p0["limit_reached"]
    assert "| full | 0.875 | fixed |" in markdown_max_seq(rows)
