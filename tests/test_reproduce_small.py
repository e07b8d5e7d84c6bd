"""scripts/reproduce_small.py --smoke: pretraining, fine-tuning variants, held-out evaluation and the report."""

import json

from scripts.reproduce_small import main


def test_reproduce_small_smoke(tmp_path):
    runs = main(out_dir=tmp_path, smoke=True, methods=("lora",), variants=["baseline", "PLD 0->0.5", "DropBP 0.875"])
    assert {r["variant"] for r in runs.values()} == {"baseline", "PLD 0->0.5", "DropBP 0.875"}
    for run in runs.values():
        assert run["log"]["curve"] and run["heldout"]["answer_perplexity"] > 0
    steps = {r["variant"]: r["steps"] for r in runs.values()}
    assert steps["DropBP 0.875"] > steps["PLD 0->0.5"] > steps["baseline"]  # the same FLOPs buy more steps
    assert (tmp_path / "pretrained" / "lit_model.pth").is_file()
    assert (tmp_path / "val_loss_lora.png").is_file() and (tmp_path / "drop_rates_lora_0.875.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "| baseline |" in report and "time to baseline's final val loss" in report
    assert json.loads((tmp_path / "results.json").read_text())["runs"]
