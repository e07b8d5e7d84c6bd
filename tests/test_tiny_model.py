from pathlib import Path

import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from litgpt.utils import check_valid_checkpoint_dir

import lit_gpt.tiny_model as tiny_model
from lit_gpt.tiny_model import (
    CHECKPOINT_FILES,
    DEFAULT_TINY_CHECKPOINT_DIR,
    TINY_MODEL_NOTE,
    ensure_tiny_checkpoint,
    pretrain_corpus,
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "dropbp-tiny-llama")


def test_checkpoint_is_valid_and_loads_into_gpt(checkpoint_dir):
    check_valid_checkpoint_dir(checkpoint_dir, raise_error=True)

    config = Config.from_checkpoint(checkpoint_dir)
    assert (config.name, config.n_layer, config.n_head, config.n_query_groups) == ("dropbp-tiny-llama", 8, 4, 4)
    assert (config.n_embd, config.intermediate_size, config.block_size) == (128, 384, 256)
    assert (config.norm_class_name, config.mlp_class_name, config.rotary_percentage) == ("RMSNorm", "LLaMAMLP", 1.0)
    assert config.padded_vocab_size % 64 == 0 and config.vocab_size <= config.padded_vocab_size

    model = GPT(config)
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    logits = model(torch.tensor([[1, 5, 9]]))
    assert logits.shape == (1, 3, config.padded_vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_adds_bos(checkpoint_dir):
    tokenizer = Tokenizer(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    assert tokenizer.vocab_size == config.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>"))

    text = "### Instruction:\nAdd the two numbers.\n\n  1234 + 56 = ?  Zebra, {quux} ~!@#$%^&*()\ttab"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text)[0] == tokenizer.bos_id  # bos by default, like LLaMA
    assert tokenizer.encode(text, bos=False)[0] != tokenizer.bos_id
    assert len(tokenizer.encode("Reverse the letters of the word.", bos=False)) < 10  # BPE merges were learned
    assert int(ids.max()) < config.padded_vocab_size


def test_creation_is_deterministic_and_idempotent(checkpoint_dir, tmp_path):
    other = ensure_tiny_checkpoint(tmp_path / "other")
    for name in CHECKPOINT_FILES:
        assert (other / name).read_bytes() == (checkpoint_dir / name).read_bytes(), name

    modified = {name: (other / name).stat().st_mtime_ns for name in CHECKPOINT_FILES}
    assert ensure_tiny_checkpoint(other) == other
    assert {name: (other / name).stat().st_mtime_ns for name in CHECKPOINT_FILES} == modified
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other"]  # no temp dir left behind


def test_interrupted_creation_leaves_nothing(tmp_path, monkeypatch):
    def write_then_fail(directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_model, "write_tiny_checkpoint", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_checkpoint(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete checkpoint"):
        ensure_tiny_checkpoint(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_default_location_and_note():
    assert DEFAULT_TINY_CHECKPOINT_DIR == Path(__file__).resolve().parents[1] / "checkpoints" / "dropbp-tiny-llama"
    assert "\n" not in TINY_MODEL_NOTE
    assert str(DEFAULT_TINY_CHECKPOINT_DIR) in TINY_MODEL_NOTE and "--checkpoint_dir" in TINY_MODEL_NOTE


def test_pretrain_corpus_is_deterministic_and_not_the_tasks():
    corpus = pretrain_corpus(500, seed=0)
    assert corpus == pretrain_corpus(500, seed=0)
    assert corpus != pretrain_corpus(500, seed=1)
    assert len(corpus) == 500 and len(set(corpus)) > 200
    assert all(isinstance(text, str) and text and "Instruction" not in text for text in corpus)
