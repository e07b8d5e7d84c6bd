import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from litgpt.tokenizer import Tokenizer

import lit_gpt.data
from finetune.data_setup import setup_data
from finetune.trainer import UsageError, prepare_data
from lit_gpt.data import JSON, Alpaca, Builtin, Dolly
from lit_gpt.data.builtin import generate_examples, split_examples
from lit_gpt.tiny_model import ensure_tiny_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # real records: 23 of Alpaca, 12 of databricks-dolly-15k

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(ensure_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "dropbp-tiny-llama"))


def question(example: dict) -> tuple[str, str]:
    return example["instruction"], example["input"]


def test_exports():
    assert set(lit_gpt.data.__all__) == {"Alpaca", "Builtin", "DataModule", "Dolly", "JSON"}
    assert issubclass(Builtin, lit_gpt.data.DataModule) and issubclass(Dolly, lit_gpt.data.DataModule)


def test_builtin_examples_are_deterministic_and_correct():
    examples = generate_examples(600, seed=3)
    assert examples == generate_examples(600, seed=3)
    assert examples != generate_examples(600, seed=4)

    answer = {
        "Reverse the letters of the word.": lambda text: text[::-1],
        "Add the two numbers.": lambda text: str(sum(int(n) for n in text.split(" + "))),
        "Write the word in capital letters.": str.upper,
        "Sort the letters in alphabetical order.": lambda text: " ".join(sorted(text.split())),
        "How many letters are in the word?": lambda text: str(len(text)),
        "Which letter comes next in the alphabet?": lambda text: chr(ord(text) + 1),
    }
    assert {example["instruction"] for example in examples} == set(answer)
    for example in examples:
        assert set(example) == {"instruction", "input", "output"}
        assert example["output"] == answer[example["instruction"]](example["input"])


def test_builtin_splits_do_not_overlap():
    examples = generate_examples(2000, seed=42)
    train, val, test = split_examples(examples, val_fraction=0.05, test_fraction=0.1)
    assert len(train) + len(val) + len(test) == len(examples)
    assert len(test) > 100 and len(val) > 30 and len(train) > 1400
    train_questions, val_questions, test_questions = ({question(e) for e in split} for split in (train, val, test))
    assert not train_questions & val_questions and not train_questions & test_questions
    assert not val_questions & test_questions

    # a question is held out whatever data set it was drawn in
    _, _, other_test = split_examples(generate_examples(2000, seed=7))
    assert not {question(e) for e in other_test} & train_questions


def test_builtin_dataloaders(tokenizer):
    data = Builtin(num_samples=300, mask_prompt=True)
    data.connect(tokenizer, batch_size=4, max_seq_length=128)
    data.prepare_data()
    data.setup()

    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 128
    assert batch["input_ids"].dtype == torch.int64
    assert (batch["labels"][:, :10] == data.ignore_index).all()  # the prompt is masked
    assert (batch["labels"] == tokenizer.eos_id).sum() == 4  # every answer ends with eos

    assert len(data.val_dataloader()) > 0
    val_questions = {question(e) for e in data.val_dataset.data}
    test_questions = {question(e) for e in data.test_examples()}
    train_questions = {question(e) for e in data.train_dataset.data}
    assert test_questions and not test_questions & (train_questions | val_questions)
    assert len(data.train_dataset) + len(data.val_dataset) + len(data.test_examples()) == 300


def write_dolly(path: Path, n: int) -> None:
    records = [
        {"instruction": f"Question {i}?", "context": f"Context {i}." if i % 2 else "", "response": f"Answer {i}."}
        for i in range(n)
    ]
    for record in records:
        record["category"] = "open_qa"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_dolly_reads_local_file(tmp_path, tokenizer):
    write_dolly(tmp_path / "databricks-dolly-15k.jsonl", 50)
    data = Dolly(download_dir=tmp_path, file_url="http://127.0.0.1:9/unreachable", num_workers=0)
    data.connect(tokenizer, batch_size=2, max_seq_length=64)
    data.prepare_data()  # the file is there: no download
    data.setup()

    assert (len(data.train_dataset), len(data.test_dataset)) == (45, 5)
    examples = data.train_dataset.data + data.test_dataset.data
    assert sorted(example["output"] for example in examples) == sorted(f"Answer {i}." for i in range(50))
    example = next(example for example in examples if example["output"] == "Answer 3.")
    assert example == {"instruction": "Question 3?", "input": "Context 3.", "output": "Answer 3."}

    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 2
    assert len(data.val_dataloader()) == 3

    again = Dolly(download_dir=tmp_path)
    again.connect(tokenizer)
    again.setup()
    assert again.test_dataset.data == data.test_dataset.data  # the split is seeded


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served over HTTP on loopback; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_dolly_downloads_when_missing(tmp_path, served):
    folder, url = served
    write_dolly(folder / "dolly.jsonl", 20)
    data = Dolly(download_dir=tmp_path / "dolly", file_url=f"{url}/dolly.jsonl")
    prepare_data(data)  # what the recipes call

    assert (tmp_path / "dolly" / "databricks-dolly-15k.jsonl").read_text() == (folder / "dolly.jsonl").read_text()
    data.setup()
    assert (len(data.train_dataset), len(data.test_dataset)) == (18, 2)


@pytest.mark.parametrize("module", [Dolly, Alpaca])
@pytest.mark.parametrize("where, reason", [("missing.json", "HTTP 404"), ("unreachable", "ConnectionError")])
def test_a_failed_download_writes_nothing_and_says_where_to_put_the_file(tmp_path, served, module, where, reason):
    url = f"{served[1]}/missing.json" if where == "missing.json" else "http://127.0.0.1:9/unreachable"
    data = module(download_dir=tmp_path / "data", file_url=url)
    with pytest.raises(FileNotFoundError) as error:
        prepare_data(data)
    message = str(error.value)
    assert reason in message and "--data.download_dir" in message and "\n" not in message
    assert not (tmp_path / "data").exists()  # litgpt would have saved the 404 page as the data set


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"instruction": "Hi", "context": ""', "not valid JSON"),
        ('["Hi", "", "Hello"]', "expected a JSON object"),
        ('{"instruction": "Hi", "response": "Hello"}', "missing or non-string fields \\['context'\\]"),
        ('{"instruction": "Hi", "context": "", "response": 3}', "missing or non-string fields \\['response'\\]"),
    ],
)
def test_dolly_malformed_file(tmp_path, line, problem):
    good = json.dumps({"instruction": "Hi", "context": "", "response": "Hello"})
    path = tmp_path / "databricks-dolly-15k.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"databricks-dolly-15k.jsonl, line 3: {problem}"):
        Dolly(download_dir=tmp_path).setup()


def test_dolly_reads_the_published_samples_as_json_lines_and_as_an_array(tmp_path, tokenizer):
    """The sample is a JSON array of real Dolly records; the published file holds the same as JSON Lines."""
    sample = FIXTURES / "dolly-sample.json"
    records = json.loads(sample.read_text())
    (tmp_path / "array").mkdir()
    (tmp_path / "array" / "databricks-dolly-15k.jsonl").write_text(sample.read_text())
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "databricks-dolly-15k.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    loaded = []
    for form in ("array", "lines"):
        data = Dolly(download_dir=tmp_path / form, val_split_fraction=0.25)
        data.connect(tokenizer, batch_size=2, max_seq_length=64)
        data.setup()
        loaded.append(data.train_dataset.data + data.test_dataset.data)
    assert loaded[0] == loaded[1] and len(loaded[0]) == len(records)
    assert {e["output"] for e in loaded[0]} == {r["response"] for r in records}


@pytest.mark.parametrize("content, held", [
    ({"data": [{"instruction": "q", "input": "", "output": "a"}] * 40}, "an object with keys data"),  # was: empty split
    ({str(i): {"instruction": "q", "output": "a"} for i in range(40)}, "an object with keys 0, 1, 2, 3, 4"),  # KeyError
    ("instruction, input, output", "a string"),
])
def test_a_json_file_that_holds_no_list_is_refused_saying_what_it_holds(tmp_path, content, held):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError) as error:
        setup_data(JSON(json_path=path, val_split_fraction=0.05))
    assert str(error.value) == (f"{path}: the file must hold a JSON list of records (objects with instruction, input"
                                f" and output); it holds {held}")
