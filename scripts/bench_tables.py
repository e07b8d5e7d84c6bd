"""What the benchmark prints: the markdown tables (Table 5's rows, the max-sequence-length rows) and the summary
lines under them (the gates' overhead against the unpatched model, a PEFT method against full fine-tuning, the gate
profile)."""


def baseline_name(row: dict) -> str:
    return "the unpatched Transformers model" if row.get("framework") == "hf" else "plain litgpt"


def markdown(rows: list) -> str:
    lines = ["| Method | Variant | FW ms | BW ms | Total ms | Reduction | Theory | Achieved/theory | BW efficiency"
             " | Saved activations | Peak GiB | ATen ops/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"pld": "PLD 0->0.5 (end of schedule)", "all": "all dropped (head only)",
             "frozen": "every weight frozen (input gradients only), p=0", "full": "full fine-tuning (gated), p=0"}
    for r in rows:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        saved = "–" if r["saved_bytes_ratio"] is None else f"{r['saved_bytes_ratio']:.3f}"
        name = f"{baseline_name(r)}, p=0" if r["variant"] == "plain" else names.get(r["variant"])
        lines.append(
            f"| {r['method']} | {name or 'DropBP ' + str(r['variant'])} | {r['fw_ms']:.1f}"
            f" | {r['bw_ms']:.1f} | {r['total_ms']:.1f} | {r['reduction']:+.0%} | {r['theory']:.0%}"
            f" | {fmt(r['achieved_over_theory'])} | {fmt(r['bw_efficiency'])} | {saved} | {r['peak_gib']:.3f}"
            f" | {r.get('aten_ops', '–')} |"
        )
    return "\n".join(lines)


def markdown_max_seq(rows: list) -> str:
    lines = ["| Method | Drop rate | Sampling | Max sequence length | First length that did not fit | Probes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        more = "+ (limit)" if r["limit_reached"] else ""
        found = "failed (see the log)" if r["max_seq_len"] is None else f"{r['max_seq_len']}{more}"
        lines.append(f"| {r['method']} | {r['rate']} | {r['sampling']} | {found}"
                     f" | {r['first_failure'] or '–'} | {len(r['probes'])} |")
    return "\n".join(lines)


def overhead_line(method: str, plain_row: dict, ours_ops: int) -> str:
    r = plain_row
    return (f"{method}: gated model at p=0 vs {baseline_name(r)}: {r['overhead']:+.1%} time"
            f" (FW {r['overhead_fw']:+.1%},"
            f" BW {r['overhead_bw']:+.1%}); median of {r['timed_rounds']} paired rounds, quartiles"
            f" [{r['overhead_q1']:+.1%}, {r['overhead_q3']:+.1%}], variant order shuffled each round (seed"
            f" {r['order_seed']}); ATen ops per step {ours_ops} vs {r['aten_ops']}")


def against_full_line(method: str, full_row: dict) -> str:
    r = full_row
    ratio = lambda key: f"{r[key]:.2f}x [{r[key + '_q1']:.2f}, {r[key + '_q3']:.2f}]"  # noqa: E731
    floor = r["floor_bw_vs_full"]
    return (f"{method} vs full fine-tuning (both gated, p=0): FW {ratio('fw_vs_full')}, BW {ratio('bw_vs_full')},"
            f" total {ratio('total_vs_full')}; median [quartiles] of {r['timed_rounds']} paired rounds"
            + ("" if floor is None else f"; input-gradient floor BW {floor:.2f}x full"))


def profile_line(r: dict) -> str:
    return (f"{r['method']}: block forward at p=0, gated vs plain litgpt: same ATen ops {r['same_aten_ops']}"
            f" ({r['aten_ops']}), Python calls {r['python_calls_gated']:.0f} vs {r['python_calls_plain']:.0f},"
            f" {r['us_gated_min']:.1f} vs {r['us_plain_min']:.1f} us (min; median {r['us_gated_median']:.1f} vs"
            f" {r['us_plain_median']:.1f}): {r['us_gated_min'] - r['us_plain_min']:+.1f} us per block (2 gates)")
