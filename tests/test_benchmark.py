"""scripts/benchmark.py on a tiny model: the table's arithmetic, not its timings (never assert a timing)."""

from scripts.benchmark import main, markdown


def test_benchmark_smoke(tmp_path):
    rows = main(methods=("full", "lora"), rates=(0.0, 0.5), n_layer=2, n_embd=64, vocab_size=128, seq_len=16,
                micro_batch_size=2, steps=1, warmup=0, out=tmp_path / "bench.json")
    assert [(r["method"], r["rate"]) for r in rows] == [("full", 0.0), ("full", 0.5), ("full", 1.0),
                                                       ("lora", 0.0), ("lora", 0.5), ("lora", 1.0)]
    full0, full1 = rows[0], rows[2]
    assert full0["reduction"] == 0 and full0["saved_bytes_ratio"] == 1.0
    assert full1["saved_bytes_ratio"] < 0.5  # every branch dropped keeps only the head's activations
    assert rows[1]["theory"] == 0.5 * 2 / 3 and rows[4]["theory"] == 0.25
    assert "| full | 0.5 |" in markdown(rows) and (tmp_path / "bench.json").is_file()
