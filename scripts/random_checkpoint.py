"""A random-init litgpt checkpoint of any litgpt config, with the built-in tokenizer, and instruction samples long
enough to fill a given sequence length: what timing a recipe at a paper's shape needs, offline.

    python scripts/random_checkpoint.py --model_name Llama-2-7b-hf --out_dir /tmp/llama-2-7b-random \
        --device cuda --precision bf16-true --seq_len 512

writes ``lit_model.pth``, ``model_config.yaml``, the built-in tokenizer's files, and ``long_samples.json`` (Alpaca
format; each sample is longer than ``--seq_len`` tokens, so ``--train.max_seq_length`` cuts every one to exactly
that length). ``scripts/gpu_acceptance.sh`` times ``finetune/lora.py`` on it against ``benchmark.py``'s rows.
"""

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from litgpt.config import Config  # noqa: E402
from litgpt.model import GPT  # noqa: E402
from litgpt.utils import save_config  # noqa: E402

from lit_gpt.data.builtin import WORDS  # noqa: E402
from lit_gpt.tiny_model import CHECKPOINT_FILES, ensure_tiny_checkpoint  # noqa: E402

DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def long_samples(n: int, seq_len: int, seed: int = 0) -> list:
    """``n`` Alpaca-format records of at least ``seq_len`` words each (every built-in word is one token or more)."""
    rng = random.Random(seed)
    return [{"instruction": "Repeat the words.", "input": "", "output": " ".join(rng.choices(WORDS, k=seq_len + 16))}
            for _ in range(n)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(
    model_name: str = "Llama-2-7b-hf",
    out_dir: Path = Path("checkpoints/random"),
    device: Optional[str] = None,
    precision: str = "bf16-true",
    seq_len: int = 512,
    num_samples: int = 64,
    n_layer: Optional[int] = None,
    n_embd: Optional[int] = None,
    n_head: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> Path:
    """Args:
    model_name: a litgpt config name (its shape; the vocabulary must hold the built-in tokenizer's 1024 ids).
    out_dir: the new checkpoint directory (replaced if it exists).
    device, precision: where the weights are initialised (default: cuda if there is a GPU, else cpu) and the dtype
        they are saved in.
    seq_len: the samples' minimum length in tokens.
    num_samples: how many samples.
    n_layer, n_embd, n_head, vocab_size: override the config's (a smaller model of the same kind, e.g. for a dry
        run; the same shape as ``benchmark.py --n_layer ... --n_embd ... --n_head ... --vocab_size ...``).
    """
    device = device or default_device()
    tokenizer_dir = ensure_tiny_checkpoint()
    overrides = {k: v for k, v in dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head).items() if v is not None}
    if n_head is not None:
        overrides["n_query_groups"] = n_head
    if n_embd is not None:  # LLaMA's MLP width, 8/3 of the width rounded to 64
        overrides["intermediate_size"] = max(64, int(n_embd * 8 / 3) // 64 * 64)
    if vocab_size is not None:
        overrides.update(vocab_size=vocab_size, padded_vocab_size=vocab_size)
    config = Config.from_name(model_name, block_size=max(seq_len, 64), **overrides)
    if config.padded_vocab_size < 1024:
        raise SystemExit(f"{model_name}'s vocabulary ({config.padded_vocab_size}) cannot hold the built-in tokenizer")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in CHECKPOINT_FILES[2:]:  # the tokenizer's files
        shutil.copy(tokenizer_dir / name, out_dir / name)
    save_config(config, out_dir)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = GPT(config)
        model.apply(model._init_weights)
    torch.save(model.to(DTYPES[precision]).state_dict(), out_dir / "lit_model.pth")
    (out_dir / "long_samples.json").write_text(json.dumps(long_samples(num_samples, seq_len)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{out_dir}: {model_name} ({config.n_layer} x {config.n_embd}, {n_params / 1e6:.1f}M parameters, random),"
          f" {num_samples} samples of at least {seq_len} tokens")
    return out_dir


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
