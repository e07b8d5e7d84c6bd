"""scripts/lora_study.py --quick: pretraining (and its cache), the grid at three sizes, the ablations, held-out
evaluation, the tables and the PNGs."""

import json
from dataclasses import replace

import pytest

from finetune.args import DropBPArgs
from scripts.lora_study import QUICK_SETTINGS, main
from scripts.reproduce_small import BACKWARD_FACTOR
from scripts.study_grid import BASELINE, EQUAL_FLOPS, EQUAL_STEPS, Job, cached_result, run_settings
from scripts.study_report import by_config, percent, row_stats


# over 30 s (about 60 to 90): the quick study is 60 fine-tuning runs with their held-out evaluations, made once for
# the module's tests
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_study")
    first = main(quick=True, out_dir=root / "out", cache_dir=root / "cache")
    return root, first


def section(report: str, title: str) -> list:
    """The body rows of the table under a '## title' heading (its header and separator left out)."""
    lines = report.split("## " + title, 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("|") and not line.startswith("|---")][1:]


def test_every_configuration_has_three_seeds_in_the_tables(study):
    root, summary = study
    report = (root / "out" / "report.md").read_text()
    runs = summary["runs"]
    assert {r["size"] for r in runs} == {"S", "M", "L"} and all(m["created"] for m in summary["models"].values())
    for size in ("S", "M", "L"):
        for method in ("lora", "full"):
            rows = section(report, f"{size}, {method}")
            expected = {("baseline", BASELINE), ("DropBP 0.875", EQUAL_STEPS), ("DropBP 0.875", EQUAL_FLOPS)}
            assert {tuple(c.strip() for c in row.split("|")[1:3]) for row in rows} == expected
            assert all(row.split("|")[3].strip() == "3" for row in rows)
    ablations = section(report, "Ablations on the LoRA gap")
    assert {row.split("|")[1].strip() for row in ablations} == {"none", "uniform allocation", "lr compensation"}
    assert all(row.split("|")[3].strip() == "3" for row in ablations)
    assert "Scale trend" in report and json.loads((root / "out" / "results.json").read_text())["runs"]


def test_the_gap_column_is_dropbp_minus_the_same_seeds_baseline(study):
    root, summary = study
    runs = [r for r in summary["runs"] if r["size"] == "M" and r["method"] == "lora" and not r["ablation"]]
    base = {r["seed"]: r for r in runs if r["rate"] == 0}
    dropbp = [r for r in runs if r["rate"] == 0.875 and r["protocol"] == EQUAL_STEPS]
    gaps = [r["final_val_loss"] - base[r["seed"]]["final_val_loss"] for r in dropbp]
    mean = sum(gaps) / 3
    sd = (sum((g - mean) ** 2 for g in gaps) / 2) ** 0.5
    row = next(r for r in section((root / "out" / "report.md").read_text(), "M, lora")
               if r.startswith(f"| DropBP 0.875 | {EQUAL_STEPS} |"))
    assert row.split("|")[7].strip() == f"{mean:+.3f} ± {sd:.3f}"


def test_equal_steps_and_equal_flops_budgets(study):
    _, summary = study
    for r in summary["runs"]:
        if r["rate"] == 0 or r["ablation"]:
            continue
        base = next(b for b in summary["runs"] if (b["size"], b["method"], b["seed"], b["rate"], b["ablation"]) ==
                    (r["size"], r["method"], r["seed"], 0.0, ""))
        if r["protocol"] == EQUAL_STEPS:
            assert r["steps"] == base["steps"]
        else:  # the baseline's FLOPs within one DropBP step, planned and realised
            k = BACKWARD_FACTOR[r["method"]]
            step_cost = 1 + k * (1 - DropBPArgs(rate=r["rate"]).rate)
            assert r["steps"] > base["steps"]
            assert abs(r["steps"] * step_cost - base["steps"] * (1 + k)) <= step_cost
            assert abs(r["flops"] - base["flops"]) <= step_cost


def test_pngs_are_written(study):
    root, _ = study
    names = {p.name for p in (root / "out").glob("*.png")}
    assert names == {f"curves_{s}_{m}.png" for s in "SML" for m in ("lora", "full")} | {"scale_trend.png"}
    assert all((root / "out" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_a_second_call_reuses_the_pretrained_models_and_the_runs(study):
    root, first = study
    second = main(quick=True, out_dir=root / "out", cache_dir=root / "cache")
    assert not any(m["created"] for m in second["models"].values())
    assert {m["dir"] for m in second["models"].values()} == {m["dir"] for m in first["models"].values()}
    assert all(r["cached"] for r in second["runs"]) and len(second["runs"]) == len(first["runs"])


def test_a_run_made_with_other_settings_runs_again(study):
    root, summary = study
    run = next(r for r in summary["runs"] if r["rate"] == 0 and r["method"] == "full" and not r["ablation"])
    run_dir = root / "out" / "runs" / run["name"]
    job = Job(**{k: run[k] for k in ("size", "method", "rate", "protocol", "seed", "steps", "ablation")})
    assert cached_result(run_dir, run_settings(job, QUICK_SETTINGS))["final_val_loss"] == run["final_val_loss"]
    # the grid's rates and seeds, and the other method's learning rate, do not change this run
    same = replace(QUICK_SETTINGS, rates=(0.5,), seeds=(7,), learning_rates={**QUICK_SETTINGS.learning_rates,
                                                                              "lora": 1.0})
    assert cached_result(run_dir, run_settings(job, same)) is not None
    # its own learning rate does: the run's name does not hold it
    other = replace(QUICK_SETTINGS, learning_rates={**QUICK_SETTINGS.learning_rates, "full": 1.0})
    assert cached_result(run_dir, run_settings(job, other)) is None
    assert cached_result(root / "missing", run_settings(job, QUICK_SETTINGS)) is None


def test_gain_kept_is_the_share_of_the_same_seeds_baseline_fall():
    def run(seed, rate, start, end):
        return {"size": "M", "method": "lora", "variant": "baseline" if rate == 0 else f"DropBP {rate:g}",
                "protocol": BASELINE if rate == 0 else EQUAL_STEPS, "ablation": "", "seed": seed, "steps": 10,
                "flops": 1.0, "train_time_s": 1.0, "final_val_loss": end,
                "curve": [{"step": 0, "val_loss": start}, {"step": 10, "val_loss": end}],
                "heldout": {"exact_match": 0.25, "answer_perplexity": 100.0}}

    runs = [run(0, 0, 3.0, 2.0), run(1, 0, 3.0, 2.5), run(0, 0.875, 3.0, 2.5), run(1, 0.875, 3.0, 2.75)]
    key = ("M", "lora", "DropBP 0.875", EQUAL_STEPS, "")
    stats = row_stats(by_config(runs), key)
    assert stats["gain kept"] == pytest.approx(0.375 / 0.75)  # mean fall over the baselines' mean fall
    assert stats["gap val loss"] == pytest.approx((0.375, 0.125 * 2**0.5))  # 0.5 and 0.25, paired by seed
    runs[:2] = [run(0, 0, 3.0, 3.25), run(1, 0, 3.0, 3.0)]  # baselines whose loss did not fall: no share
    assert percent(row_stats(by_config(runs), key)["gain kept"]) == "– (baseline's loss rose)"
