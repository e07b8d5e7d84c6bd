"""eval/: the lm-eval model against scores computed by hand with litgpt's model, the CLI, bad input, the table.

Offline: local task YAMLs over local JSONL files, and the built-in tiny checkpoint (random weights).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON data only: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval
import pytest
import torch
import yaml
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.model import GPT as LitGPT
from litgpt.tokenizer import Tokenizer
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from eval import evaluate, make_table
from eval.builtin_task import write_builtin_tasks
from eval.lm_eval_harness import LitGPTLM
from eval.presets import markdown_table, table_row
from finetune import lora
from lit_gpt.data.builtin import Builtin
from lit_gpt.tiny_model import ensure_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4

MC_DOCS = [
    {"question": "Which one is a fruit?", "choices": ["apple", "road", "a yellow tiger near the river"]},
    {"question": "What color is the sky?", "choices": ["blue", "green", "white", "the color of snow at night"]},
    {"question": "Add 3 and 4.", "choices": ["7", "8", "34"]},
    {"question": "Which letter comes after b?", "choices": ["c", "a", "z z z"]},
]
GEN_QUESTIONS = ["The word cat is spelled", "Counting up from 5:", "A cow is a kind of"]
PPL_TEXTS = [
    "The sky is blue.",
    " ".join(f"Counting up from {i}: {i}, {i + 1}, {i + 2}. The word dog is spelled d o g." for i in range(20)),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's matrices are too small for a second thread to help; on a busy CPU it slows everything down
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """litgpt's own GPT (no DropBP gates) with the checkpoint's weights, and litgpt's tokenizer."""
    model = LitGPT(Config.from_file(checkpoint_dir / "model_config.yaml"))
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth"))
    return model.eval(), Tokenizer(checkpoint_dir)


@torch.inference_mode()
def token_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i = 1 .. len(tokens) - 1, from one forward pass."""
    x = torch.tensor(tokens)
    return model(x[None, :-1])[0].log_softmax(-1).gather(-1, x[1:, None])[:, 0]


def continuation_logprob(reference, context: str, continuation: str) -> float:
    model, tokenizer = reference
    n_context = len(tokenizer.encode(context))
    return token_logprobs(model, tokenizer.encode(context + continuation).tolist())[n_context - 1 :].sum().item()


def rolling_logprob(reference, text: str) -> float:
    """Every token scored once, in chunks of max_seq_length tokens, each token predicted from the max_seq_length
    tokens that end its chunk's inputs (the first chunk's start from BOS)."""
    model, tokenizer = reference
    length = model.max_seq_length
    sequence = [tokenizer.bos_id] + tokenizer.encode(text, bos=False).tolist()
    n_tokens, start, total = len(sequence) - 1, 0, 0.0
    while start < n_tokens:
        end = min(n_tokens, start + length)  # this chunk predicts sequence[start + 1 : end + 1]
        total += token_logprobs(model, sequence[max(0, end - length) : end + 1])[-(end - start) :].sum().item()
        start = end
    return total


@torch.inference_mode()
def greedy_text(reference, context: str, max_new_tokens: int) -> str:
    """Greedy decoding with a full forward pass per token (no KV cache)."""
    model, tokenizer = reference
    tokens = tokenizer.encode(context).tolist()
    new_tokens = []
    for _ in range(max_new_tokens):
        token = model(torch.tensor([tokens + new_tokens]))[0, -1].argmax().item()
        if token == tokenizer.eos_id:
            break
        new_tokens.append(token)
    return tokenizer.decode(torch.tensor(new_tokens))


def mc_context(doc) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def write_task(task_dir: Path, name: str, docs: list[dict], config: dict) -> Path:
    data_path = task_dir / f"{name}.jsonl"
    data_path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    data = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_path)}}, "test_split": "test"}
    yaml_path = task_dir / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump({"task": name, **data, **config}))
    return yaml_path


@pytest.fixture(scope="module")
def expected(reference):
    """Hand-computed scores of every document; gold answers are set so that half of them are right."""
    mc_docs, mc_lls = [], []
    for i, doc in enumerate(MC_DOCS):
        lls = [continuation_logprob(reference, mc_context(doc), " " + choice) for choice in doc["choices"]]
        best = max(range(len(lls)), key=lls.__getitem__)
        mc_docs.append({**doc, "label": best if i % 2 == 0 else (best + 1) % len(lls)})
        mc_lls.append(lls)
    generations = [greedy_text(reference, f"Question: {q}\nAnswer:", 6).split("\n")[0] for q in GEN_QUESTIONS]
    gen_docs = [
        {"question": q, "answer": text if i != 1 else text + " (not what the model says)"}
        for i, (q, text) in enumerate(zip(GEN_QUESTIONS, generations))
    ]
    return {
        "mc_docs": mc_docs,
        "mc_lls": mc_lls,
        "gen_docs": gen_docs,
        "generations": generations,
        "ppl": [rolling_logprob(reference, text) for text in PPL_TEXTS],
    }


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, expected) -> Path:
    task_dir = tmp_path_factory.mktemp("tasks")
    mc = {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    gen = {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }
    ppl = {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    }
    write_task(task_dir, "tiny_mc", expected["mc_docs"], mc)
    write_task(task_dir, "tiny_gen", expected["gen_docs"], gen)
    write_task(task_dir, "tiny_ppl", [{"text": text} for text in PPL_TEXTS], ppl)
    return task_dir


@pytest.fixture(scope="module")
def task_manager(task_dir) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def run_tasks(lm, task_manager, tasks) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True)


def samples(results: dict, task: str) -> list[dict]:
    """lm-eval's record of each document (its requests' responses under "resps"), in document order."""
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def scores(results: dict, task: str) -> list[float]:
    """Every log-likelihood the model returned for a task: one per choice, or one per rolling document."""
    flat = [response[0] for sample in samples(results, task) for response in sample["resps"]]
    return [score[0] if isinstance(score, (list, tuple)) else score for score in flat]


@pytest.fixture(scope="module")
def batched_results(checkpoint_dir, task_manager) -> dict:
    lm = LitGPTLM.from_checkpoint(checkpoint_dir, batch_size=3, device="cpu")
    return run_tasks(lm, task_manager, ["tiny_mc", "tiny_gen", "tiny_ppl"])


def test_multiple_choice_matches_hand_computation(batched_results, expected):
    assert scores(batched_results, "tiny_mc") == pytest.approx(sum(expected["mc_lls"], []), abs=TOL)
    docs_and_lls = list(zip(expected["mc_docs"], expected["mc_lls"]))
    hand_acc = [max(range(len(lls)), key=lls.__getitem__) == doc["label"] for doc, lls in docs_and_lls]
    hand_acc_norm = [
        max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
        for doc, lls in docs_and_lls
    ]
    result = batched_results["results"]["tiny_mc"]
    assert sum(hand_acc) / len(hand_acc) == 0.5
    assert result["acc,none"] == pytest.approx(0.5)
    assert result["acc_norm,none"] == pytest.approx(sum(hand_acc_norm) / len(hand_acc_norm))


def test_generation_matches_greedy_decoding_by_hand(batched_results, expected):
    assert [sample["resps"][0][0] for sample in samples(batched_results, "tiny_gen")] == expected["generations"]
    assert batched_results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)


def test_rolling_loglikelihood_matches_hand_computation(batched_results, expected, reference):
    _, tokenizer = reference
    assert len(tokenizer.encode(PPL_TEXTS[1])) > 256, "the long document must need several windows"
    assert scores(batched_results, "tiny_ppl") == pytest.approx(expected["ppl"], abs=TOL)
    words = sum(len(text.split()) for text in PPL_TEXTS)
    word_perplexity = torch.tensor(-sum(expected["ppl"]) / words).exp().item()
    assert batched_results["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(word_perplexity, rel=1e-4)


def test_batch_size_does_not_change_scores(checkpoint_dir, task_manager, batched_results):
    lm = LitGPTLM.from_checkpoint(checkpoint_dir, batch_size=1, device="cpu")
    one_by_one = run_tasks(lm, task_manager, ["tiny_mc", "tiny_ppl"])
    for task in ("tiny_mc", "tiny_ppl"):
        assert scores(one_by_one, task) == pytest.approx(scores(batched_results, task), abs=1e-5)


def test_generation_stops_at_stop_strings_and_token_limit(checkpoint_dir, reference):
    lm = LitGPTLM.from_checkpoint(checkpoint_dir, device="cpu")
    context = "The word dog is spelled"
    full = greedy_text(reference, context, 8)
    stop = full[len(full) // 2 :][:2]  # a stop string in the middle of what the model generates
    requests = [
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 8}), 0),
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 8}), 1),
        Instance("generate_until", {}, (context, {"until": ["never generated"], "max_gen_toks": 3}), 2),
    ]
    cut, unstopped, short = lm.generate_until(requests, disable_tqdm=True)
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    assert unstopped == full
    assert short == greedy_text(reference, context, 3)


def test_precision_bf16_and_empty_context(checkpoint_dir, reference):
    lm = LitGPTLM.from_checkpoint(checkpoint_dir, device="cpu", precision="bf16-true")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    request = Instance("loglikelihood", {}, ("", "The sky is blue."), 0)
    [(logprob, _)] = lm.loglikelihood([request], disable_tqdm=True)
    assert logprob == pytest.approx(continuation_logprob(reference, "", "The sky is blue."), rel=0.02)


def test_cli_writes_results_and_table_row(checkpoint_dir, task_dir, tmp_path, batched_results, capsys):
    evaluate.cli(["--checkpoint_dir", str(checkpoint_dir), "--tasks", str(task_dir / "tiny_mc.yaml"),
                  "--batch_size", "2", "--device", "cpu", "--out_dir", str(tmp_path), "--metric", "acc_norm"])
    results = json.loads((tmp_path / "results_tiny_mc.json").read_text())
    acc_norm = results["results"]["tiny_mc"]["acc_norm,none"]
    assert acc_norm == pytest.approx(batched_results["results"]["tiny_mc"]["acc_norm,none"])
    assert results["config"]["checkpoint_dir"] == str(checkpoint_dir)
    table = (tmp_path / "table_tiny_mc.md").read_text()
    assert "| tiny_mc (0-shot acc_norm) |" in table
    assert f"| {100 * acc_norm:.2f} |" in table
    assert table in capsys.readouterr().out + "\n"

    # a directory evaluates every task its YAML files define
    evaluate.cli(["--checkpoint_dir", str(checkpoint_dir), "--tasks", str(task_dir), "--out_dir", str(tmp_path)])
    second = json.loads((tmp_path / f"results_{task_dir.name}.json").read_text())
    assert sorted(second["results"]) == ["tiny_gen", "tiny_mc", "tiny_ppl"]
    # lm-eval's record of the environment, in both (taken once per process: it runs pip), and its own function back
    assert "PyTorch version" in results["pretty_env_info"] and results["transformers_version"]
    assert all(second[key] == results[key] for key in ("pretty_env_info", "transformers_version", "upper_git_hash"))
    assert lm_eval.evaluator.add_env_info is evaluate.LM_EVAL_ENV_INFO


def test_the_environment_record_is_taken_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lm_eval.evaluator.add_env_info)  # lm-eval's, back after
    monkeypatch.setattr(evaluate, "LM_EVAL_ENV_INFO", lambda info: calls.append(1) or info.update(pretty_env_info="x"))
    evaluate.environment_info.cache_clear()
    try:
        for _ in range(2):
            results = {}
            with evaluate.environment_recorded_once():
                lm_eval.evaluator.add_env_info(results)
            assert results == {"pretty_env_info": "x"}
    finally:
        evaluate.environment_info.cache_clear()
    assert len(calls) == 1 and lm_eval.evaluator.add_env_info is evaluate.LM_EVAL_ENV_INFO


def copy_checkpoint(checkpoint_dir: Path, target: Path, state_dict: dict, lora_only: bool = False) -> Path:
    """The checkpoint's config and tokenizer, with ``state_dict`` as lit_model.pth (or as LoRA weights only)."""
    target.mkdir()
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((checkpoint_dir / name).read_bytes())
    torch.save(state_dict, target / ("lit_model.pth.lora" if lora_only else "lit_model.pth"))
    return target


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "checkpoint directory not found"),
        ("missing_files", "missing lit_model.pth, tokenizer.json or tokenizer.model"),
        ("lora_only", "LoRA weights only"),
        ("unmerged", "does not fit model_config.yaml: 2 weights missing and 2 unexpected"),
        ("missing_yaml", "task file not found: nope/qa.yaml"),
        ("preset_mixed", "run a preset on its own"),
        ("no_gpu", "PyTorch sees no GPU"),
        ("truncated", "lit_model.pth cannot be read as a litgpt checkpoint"),
        ("truncated_adapter", "lit_model.pth.adapter_v2 cannot be read as a litgpt checkpoint"),
    ],
)
def test_bad_input_is_one_line_on_stderr(case, message, checkpoint_dir, task_dir, tmp_path, capsys):
    if case == "no_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = {"checkpoint_dir": checkpoint_dir, "tasks": "commonsense"}
    if case == "missing_dir":
        args["checkpoint_dir"] = tmp_path / "nowhere"
    elif case == "missing_files":
        args["checkpoint_dir"] = tmp_path
        (tmp_path / "model_config.yaml").write_text("{}")
    elif case == "lora_only":
        args["checkpoint_dir"] = copy_checkpoint(checkpoint_dir, tmp_path / "lora", {}, lora_only=True)
    elif case == "unmerged":  # a LoRA model's own state dict: its linear layers' weights sit one level deeper
        state_dict = torch.load(checkpoint_dir / "lit_model.pth")
        state_dict["lm_head.linear.weight"] = state_dict.pop("lm_head.weight")
        state_dict["transformer.h.0.attn.qkv.linear.weight"] = state_dict.pop("transformer.h.0.attn.qkv.weight")
        args["checkpoint_dir"] = copy_checkpoint(checkpoint_dir, tmp_path / "unmerged", state_dict)
        args["tasks"] = task_dir / "tiny_mc.yaml"
    elif case == "missing_yaml":
        args["tasks"] = "nope/qa.yaml"
    elif case == "preset_mixed":
        args["tasks"] = "mmlu,piqa"
    elif case == "no_gpu":
        args["device"] = "cuda"
    elif case.startswith("truncated"):  # a copy cut short (a full disk, an interrupted transfer)
        state_dict = torch.load(checkpoint_dir / "lit_model.pth")
        target = args["checkpoint_dir"] = copy_checkpoint(checkpoint_dir, tmp_path / "truncated", state_dict)
        torn = target / ("lit_model.pth.adapter_v2" if case == "truncated_adapter" else "lit_model.pth")
        if case == "truncated_adapter":
            torch.save({"transformer.h.0.attn.adapter_wte.weight": torch.zeros(4, 64)}, torn)
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        args["tasks"] = task_dir / "tiny_mc.yaml"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli([f"--{key}={value}" for key, value in args.items()])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr
    if case == "lora_only":
        assert "litgpt merge_lora" in stderr and "final/" in stderr


# over 30 s: a fresh process importing lm-eval and litgpt, as a user's shell runs the script
def test_script_reports_an_unknown_task_without_traceback(checkpoint_dir):
    result = subprocess.run(
        [sys.executable, "eval/evaluate.py", "--checkpoint_dir", str(checkpoint_dir), "--tasks", "piqaa"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown lm-eval task: piqaa (did you mean piqa")
    assert result.stderr.count("\n") == 1


def fake_results(task_scores: dict[str, dict[str, float]], shots: int, groups: dict | None = None) -> dict:
    """A results dict shaped like lm-eval's."""
    return {
        "results": {t: {"alias": t, **{f"{k},none": v for k, v in s.items()}} for t, s in task_scores.items()},
        "group_subtasks": groups or {},
        "n-shot": {task: shots for task in task_scores},
        "config": {"checkpoint_dir": "out/unused/final"},
    }


def fake_mmlu(offset: float) -> dict:
    groups = ("mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other")
    task_scores = {group: {"acc": 0.40 + offset + i / 100, "acc_stderr": 0.01} for i, group in enumerate(groups)}
    task_scores["mmlu"] = {"acc": 0.45 + offset}
    task_scores["mmlu_anatomy"] = {"acc": 0.9}  # a subject: part of a group, not a column of its own
    results = fake_results(task_scores, 5, {"mmlu": list(groups), "mmlu_stem": ["mmlu_anatomy"]})
    del results["n-shot"]["mmlu"]  # as lm-eval 0.4.13 writes it: no few-shot setting for a group of groups
    return results


def fake_commonsense(offset: float) -> dict:
    tasks = ("piqa", "hellaswag", "arc_challenge", "arc_easy", "openbookqa")
    task_scores = {task: {"acc": 0.5 + offset, "acc_norm": 0.6 + offset + i / 100} for i, task in enumerate(tasks)}
    task_scores["winogrande"] = {"acc": 0.7 + offset}
    return fake_results(task_scores, 0)


def test_table_row_states_metric_and_averages():
    row = table_row(fake_commonsense(0.0))
    assert list(row) == [
        "PIQA (0-shot acc_norm)", "HellaSwag (0-shot acc_norm)", "ARC-c (0-shot acc_norm)",
        "ARC-e (0-shot acc_norm)", "OBQA (0-shot acc_norm)", "WinoGrande (0-shot acc)", "Commonsense Average",
    ]  # fmt: skip
    assert row["Commonsense Average"] == pytest.approx((60 + 61 + 62 + 63 + 64 + 70) / 6)
    row = table_row(fake_commonsense(0.0), metric="acc")
    assert row["PIQA (0-shot acc)"] == pytest.approx(50) and row["Commonsense Average"] == pytest.approx(320 / 6)
    row = table_row(fake_mmlu(0.0))
    assert list(row) == [
        "MMLU Humanities (5-shot acc)", "MMLU STEM (5-shot acc)", "MMLU Social Sciences (5-shot acc)",
        "MMLU Other (5-shot acc)", "MMLU Average (5-shot acc)",
    ]  # fmt: skip
    assert row["MMLU Average (5-shot acc)"] == pytest.approx(45)


def test_make_table_gathers_labelled_runs(tmp_path):
    runs = {"LoRA": 0.0, "LoRA + PLD": -0.02, "LoRA + DropBP p=0.5": 0.01}
    for label, offset in runs.items():
        run_dir = tmp_path / label.replace(" ", "_")
        run_dir.mkdir()
        (run_dir / "results_commonsense.json").write_text(json.dumps(fake_commonsense(offset)))
        if label != "LoRA + PLD":
            (run_dir / "results_mmlu.json").write_text(json.dumps(fake_mmlu(offset)))
    extra = tmp_path / "pld_mmlu.json"  # one run's results may also come as separate files under one label
    extra.write_text(json.dumps(fake_mmlu(-0.02)))
    args = [f"{label}={tmp_path / label.replace(' ', '_')}" for label in runs] + [f"LoRA + PLD={extra}"]
    args.append(f"No MMLU={tmp_path / 'LoRA_+_PLD' / 'results_commonsense.json'}")
    out_dir = tmp_path / "table"
    result = subprocess.run(
        [sys.executable, "eval/make_table.py", *args, "--out_dir", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    table = (out_dir / "table.md").read_text()
    assert table in result.stdout + "\n"
    lines = table.splitlines()
    assert lines[0].startswith("| Run | MMLU Humanities (5-shot acc) |") and "| WinoGrande (0-shot acc) |" in lines[0]
    labels = [line.split(" | ")[0] for line in lines[2:]]
    assert labels == ["| LoRA", "| LoRA + PLD", "| LoRA + DropBP p=0.5", "| No MMLU"]
    assert lines[3].startswith("| LoRA + PLD | 38.00 | 39.00 | 40.00 | 41.00 | 43.00 | 58.00 |")
    assert lines[5].startswith("| No MMLU | - | - | - | - | - | 58.00 |")

    with open(out_dir / "table.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows[2]["Run"] == "LoRA + DropBP p=0.5" and float(rows[2]["MMLU Average (5-shot acc)"]) == pytest.approx(46)
    assert rows[3]["MMLU STEM (5-shot acc)"] == ""


def test_make_table_bad_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_table.cli([f"baseline={tmp_path / 'missing.json'}", "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: no results JSON at {tmp_path / 'missing.json'}\n"


def test_markdown_table_marks_missing_columns():
    table = markdown_table({"a": {"x (0-shot acc)": 12.345}, "b": {"y (0-shot acc)": 1.0}})
    assert table.splitlines()[2:] == ["| a | 12.35 | - |", "| b | - | 1.00 |"]


def test_fine_tuned_builtin_model_beats_its_untrained_start(checkpoint_dir, tmp_path):
    """LoRA fine-tuning on the built-in data, then the held-out questions: the true answers get likelier."""
    lora.setup(
        checkpoint_dir=checkpoint_dir,
        out_dir=tmp_path / "lora",
        data=Builtin(),
        train=TrainArgs(max_steps=30, global_batch_size=8, micro_batch_size=8, lr_warmup_steps=2, save_interval=None),
        eval=EvalArgs(interval=1000, max_iters=1, initial_validation=False, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    )
    task_dir = tmp_path / "builtin_tasks"
    write_builtin_tasks(task_dir, max_examples=40)
    perplexity = {}
    for run, run_dir in {"untrained": checkpoint_dir, "fine-tuned": tmp_path / "lora" / "final"}.items():
        results = evaluate.main(run_dir, str(task_dir), batch_size=16, device="cpu", out_dir=tmp_path / run)
        perplexity[run] = results["results"]["builtin_qa_loglik"]["perplexity,none"]
        assert "exact_match,none" in results["results"]["builtin_qa"]
    assert perplexity["fine-tuned"] < perplexity["untrained"] / 2


def test_an_adapter_runs_final_dir_evaluates_with_its_adapter(checkpoint_dir, tmp_path):
    """An adapter run's final/ holds the base weights beside the adapter's: the evaluated model is base + adapter
    (the adapter-v2 GPT), not the base alone."""
    import lit_gpt.adapter_v2
    from finetune import adapter

    adapter.setup(
        checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "adapter", data=Builtin(num_samples=64),
        train=TrainArgs(max_steps=3, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1, save_interval=None),
        eval=EvalArgs(interval=1000, max_iters=1, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}},
    )
    final = tmp_path / "adapter" / "final"
    lm = LitGPTLM.from_checkpoint(final, device="cpu", precision="32-true")
    assert isinstance(lm.model, lit_gpt.adapter_v2.GPT)
    expected = lit_gpt.adapter_v2.GPT(lit_gpt.adapter_v2.Config.from_file(final / "model_config.yaml"))
    trained = torch.load(final / "lit_model.pth.adapter_v2")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "adapter_bias" in k)  # the adapter learned something
    expected.load_state_dict({**torch.load(checkpoint_dir / "lit_model.pth"), **trained})
    x = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(lm.model(x), expected.eval()(x))
        assert not torch.equal(lm.model(x), LitGPTLM.from_checkpoint(checkpoint_dir, device="cpu").model(x))


def test_a_hub_task_whose_data_cannot_be_fetched_is_one_line_exit_3(checkpoint_dir, monkeypatch, capsys):
    """Offline, lm-eval fails deep in the hub client ("Cannot send a request, as the client has been closed.")."""
    def offline(*args, **kwargs):
        raise RuntimeError("Cannot send a request, as the client has been closed.")

    monkeypatch.setattr(evaluate, "evaluate", offline)
    piqa_only = Path(lm_eval.tasks.__file__).parent / "piqa"  # indexing all of lm-eval's tasks takes 10-25 s
    monkeypatch.setattr(evaluate, "TaskManager", lambda **_: TaskManager(include_path=str(piqa_only),
                                                                         include_defaults=False))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli([f"--checkpoint_dir={checkpoint_dir}", "--tasks=piqa"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the data of piqa could not be loaded" in err and "local task YAMLs" in err


def test_an_uncached_hub_preset_offline_names_its_data_set_and_how_to_run_offline(checkpoint_dir, monkeypatch, capsys):
    """``--tasks mmlu`` without internet and without the data cached: the line names the task and the data set that
    failed, and how to run offline."""
    import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Cannot send a request, as the client has been closed.")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # what lm-eval's tasks call to fetch their data
    mmlu_only = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"  # indexing all of lm-eval's tasks takes 25 s
    monkeypatch.setattr(evaluate, "TaskManager", lambda **_: TaskManager(include_path=str(mmlu_only),
                                                                         include_defaults=False))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli([f"--checkpoint_dir={checkpoint_dir}", "--tasks=mmlu", "--device=cpu"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: the data of mmlu (Hugging Face data set cais/mmlu, subset ")
    assert "could not be loaded (RuntimeError: Cannot send a request" in err and "HF_DATASETS_OFFLINE=1" in err
