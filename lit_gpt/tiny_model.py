"""The built-in tiny LLaMA-architecture checkpoint, created offline so every recipe runs with no download.

It has a byte-level BPE tokenizer trained here on the built-in data, litgpt's `model_config.yaml` and a random-init
`lit_model.pth`: the same files `litgpt download` leaves, so the recipes load it like any other checkpoint.
"""

import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.utils import save_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lit_gpt.data.builtin import WORDS, generate_examples

TINY_MODEL_NAME = "dropbp-tiny-llama"
DEFAULT_TINY_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / TINY_MODEL_NAME
TINY_MODEL_NOTE = (
    f"No --checkpoint_dir given: using the built-in tiny LLaMA-architecture model at {DEFAULT_TINY_CHECKPOINT_DIR}"
    " (random init, local tokenizer). For a real model: litgpt download meta-llama/Llama-2-7b-hf,"
    " then pass --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf"
)
CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")
VOCAB_SIZE = 1024
SEED = 1337


def ensure_tiny_checkpoint(checkpoint_dir: Path | None = None) -> Path:
    """Returns the tiny checkpoint's directory, creating the checkpoint first if it is not there yet."""
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else DEFAULT_TINY_CHECKPOINT_DIR
    if is_complete(checkpoint_dir):
        return checkpoint_dir
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        raise FileExistsError(
            f"{checkpoint_dir} exists but is not a complete checkpoint (it needs {', '.join(CHECKPOINT_FILES)})."
            " Delete it or choose another directory."
        )

    # Written next to the target then renamed into place: an interrupted run never leaves half a checkpoint
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{checkpoint_dir.name}-", dir=checkpoint_dir.parent))
    try:
        write_tiny_checkpoint(tmp_dir)
        try:
            os.replace(tmp_dir, checkpoint_dir)
        except OSError:
            if not is_complete(checkpoint_dir):  # else another process created it first, which is fine
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return checkpoint_dir


def is_complete(checkpoint_dir: Path) -> bool:
    return all((checkpoint_dir / name).is_file() for name in CHECKPOINT_FILES)


def write_tiny_checkpoint(checkpoint_dir: Path) -> None:
    tokenizer = train_tokenizer()
    tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 256,
    }
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    config = tiny_config(vocab_size=tokenizer.get_vocab_size())
    save_config(config, checkpoint_dir)

    with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the caller's random state
        torch.manual_seed(SEED)
        model = GPT(config)
        model.apply(model._init_weights)
    torch.save(model.state_dict(), checkpoint_dir / "lit_model.pth")


def tiny_config(vocab_size: int) -> Config:
    return Config(
        name=TINY_MODEL_NAME,
        block_size=256,
        vocab_size=vocab_size,
        padding_multiple=64,
        n_layer=8,
        n_head=4,
        n_query_groups=4,
        n_embd=128,
        intermediate_size=384,  # a multiple of 64: bitsandbytes 4-bit blocks on CPU
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
    )


def train_tokenizer() -> HFTokenizer:
    """A byte-level BPE (any text round-trips) trained on the built-in data, with digits kept one per token."""
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],  # LLaMA's ids: 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompt_style = PromptStyle.from_name("alpaca")
    finetune_texts = [
        prompt_style.apply(example["instruction"], **example) + example["output"]
        for example in generate_examples(2000, seed=SEED)
    ]
    tokenizer.train_from_iterator(finetune_texts + pretrain_corpus(4000, seed=SEED), trainer=trainer)
    return tokenizer


def pretrain_corpus(n: int, seed: int) -> list[str]:
    """`n` plain sentences about numbers, letters, words and things, the same ones for the same seed.

    Used to pretrain the tiny model, so that fine-tuning starts from a model that knows something. They state
    facts; they are not the instruction tasks of `lit_gpt.data.builtin`.
    """
    rng = random.Random(seed)
    return [rng.choice(SENTENCE_TEMPLATES)(rng) for _ in range(n)]


THINGS = {
    "animal": ("cat", "dog", "cow", "duck", "fish", "frog", "goat", "horse", "lion", "mouse", "owl", "pig", "tiger"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "brown", "pink"),
    "place": ("farm", "hill", "house", "river", "road", "town", "yard"),
}
COLOR_OF = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black", "rose": "red"}
NAMES = ("Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jill")


def counting(rng: random.Random) -> str:
    start = rng.randint(0, 95)
    return "Counting up from {}: {}.".format(start, ", ".join(str(i) for i in range(start, start + rng.randint(3, 6))))


def alphabet_run(rng: random.Random) -> str:
    start = rng.randint(0, 20)
    return "In the alphabet, {} come in this order.".format(", ".join(string.ascii_lowercase[start : start + 5]))


def spelling(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return f"The word {word} is spelled {' '.join(word)}."


def capital_letter(rng: random.Random) -> str:
    letter = rng.choice(string.ascii_lowercase)
    return f"The small letter {letter} is written {letter.upper()} as a capital letter."


def comparison(rng: random.Random) -> str:
    a, b = rng.sample(range(100), 2)
    return f"{a} is {'bigger' if a > b else 'smaller'} than {b}."


def kind_of_thing(rng: random.Random) -> str:
    kind = rng.choice(list(THINGS))
    return f"A {rng.choice(THINGS[kind])} is a kind of {kind}."


def color_fact(rng: random.Random) -> str:
    thing = rng.choice(list(COLOR_OF))
    return f"The {thing} is {COLOR_OF[thing]}."


def little_story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    color, animal, place = (rng.choice(THINGS[kind]) for kind in ("color", "animal", "place"))
    return f"{name} saw a {color} {animal} near the {place}. {name} liked the {animal}."


SENTENCE_TEMPLATES = (
    counting,
    alphabet_run,
    spelling,
    capital_letter,
    comparison,
    kind_of_thing,
    color_fact,
    little_story,
)
