"""Built-in instruction data: small tasks with exact short answers, generated offline from a seed.

It lets every recipe run with no download, and its answers can be checked exactly by the evaluation code.
"""

import random
import string
import zlib
from dataclasses import dataclass, field

import torch
from litgpt.data import DataModule, SFTDataset, get_sft_collate_fn
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

WORDS = (
    "apple", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud",
    "coat", "cow", "cup", "desk", "dog", "door", "duck", "egg", "farm", "fish",
    "flag", "frog", "game", "gift", "girl", "goat", "gold", "grass", "hand", "hat",
    "hill", "horse", "house", "ice", "jam", "key", "kite", "lamp", "leaf", "lion",
    "map", "milk", "moon", "mouse", "nest", "night", "note", "owl", "pen", "pig",
    "plant", "rain", "ring", "river", "road", "rock", "rose", "salt", "sand", "ship",
    "shoe", "sky", "snow", "sock", "song", "star", "stone", "sun", "table", "tent",
    "tiger", "town", "toy", "train", "tree", "van", "wall", "water", "whale", "wind",
    "wolf", "wood", "yard", "zebra",
)  # fmt: skip


def reverse_word(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def add_numbers(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def uppercase_word(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Write the word in capital letters.", word, word.upper()


def sort_letters(rng: random.Random) -> tuple[str, str, str]:
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
    return "Sort the letters in alphabetical order.", " ".join(letters), " ".join(sorted(letters))


def count_letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "How many letters are in the word?", word, str(len(word))


def next_letter(rng: random.Random) -> tuple[str, str, str]:
    letter = rng.choice(string.ascii_lowercase[:-1])  # 'z' has no next letter
    return "Which letter comes next in the alphabet?", letter, chr(ord(letter) + 1)


TASKS = (reverse_word, add_numbers, uppercase_word, sort_letters, count_letters, next_letter)


def sft_dataset(module: DataModule, data: list[dict[str, str]]) -> SFTDataset:
    """litgpt's SFT dataset over ``data`` with a data module's tokenizer, prompt style and masking settings."""
    return SFTDataset(
        data=data,
        tokenizer=module.tokenizer,
        prompt_style=module.prompt_style,
        max_seq_length=module.max_seq_length,
        mask_prompt=module.mask_prompt,
        ignore_index=module.ignore_index,
    )


def generate_examples(n: int, seed: int = 42) -> list[dict[str, str]]:
    """Returns `n` Alpaca-style examples (`instruction`, `input`, `output`), the same ones for the same seed."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        instruction, input_text, output = rng.choice(TASKS)(rng)
        examples.append({"instruction": instruction, "input": input_text, "output": output})
    return examples


def split_examples(
    examples: list[dict[str, str]], val_fraction: float = 0.05, test_fraction: float = 0.1
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Splits examples into train, val and test.

    A question's split is picked by a hash of its text, not by its position, so a question (which the generator
    may draw more than once) always lands in one split: the splits never overlap, whatever `n` and `seed` were,
    and test questions are never trained on.
    """
    train, val, test = [], [], []
    for example in examples:
        question = f"{example['instruction']}\n{example['input']}".encode()
        position = zlib.crc32(question) / 2**32  # uniform in [0, 1)
        if position < test_fraction:
            test.append(example)
        elif position < test_fraction + val_fraction:
            val.append(example)
        else:
            train.append(example)
    return train, val, test


@dataclass
class Builtin(DataModule):
    """Built-in synthetic instruction data (reverse, add, uppercase, sort, count, next letter); no download."""

    mask_prompt: bool = False
    """Whether to mask the prompt section from the label (with ``ignore_index``)."""
    val_split_fraction: float = 0.05
    """The fraction of the questions used for the validation dataset."""
    test_split_fraction: float = 0.1
    """The fraction of the questions held out for evaluation (see `test_examples`); never trained on."""
    prompt_style: str | PromptStyle = "alpaca"
    """The style to apply to instruction prompts. See `litgpt.prompts` for a list of available styles."""
    ignore_index: int = -100
    """The index to use for elements to be ignored in the label."""
    seed: int = 42
    """The random seed for generating the examples and shuffling the dataset."""
    num_workers: int = 0
    """How many DataLoader processes to use for loading."""
    num_samples: int = 2000
    """How many examples to generate, before splitting."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)
    train_dataset: SFTDataset | None = field(default=None, init=False, repr=False)
    val_dataset: SFTDataset | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if isinstance(self.prompt_style, str):
            self.prompt_style = PromptStyle.from_name(self.prompt_style)

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length

    def splits(self) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
        examples = generate_examples(self.num_samples, self.seed)
        return split_examples(examples, self.val_split_fraction, self.test_split_fraction)

    def test_examples(self) -> list[dict[str, str]]:
        """The held-out examples, for scoring generated answers against `output`."""
        return self.splits()[2]

    def setup(self, stage: str = "") -> None:
        train_data, val_data, _ = self.splits()
        self.train_dataset = self.sft_dataset(train_data)
        self.val_dataset = self.sft_dataset(val_data)

    def sft_dataset(self, data: list[dict[str, str]]) -> SFTDataset:
        return sft_dataset(self, data)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(max_seq_length=self.max_seq_length, ignore_index=self.ignore_index),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=get_sft_collate_fn(max_seq_length=self.max_seq_length, ignore_index=self.ignore_index),
        )
