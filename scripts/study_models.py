"""Small pretrained models for the CPU-scale studies, cached on disk by size and pretraining settings.

`pretrain` (shared with scripts/reproduce_small.py) trains a LLaMA-architecture model of the built-in tokenizer by
plain next-token prediction. With ``instruct_fraction`` > 0 the corpus also holds instruction examples in the
fine-tuning prompt format, drawn from the *train* split only (a question's split is fixed by a hash of its text, see
`lit_gpt.data.builtin.split_examples`), from another generator seed than the fine-tuning data: like a LLaMA2 that has
seen instruction-like text, the model then knows the format and the skills, and fine-tuning adjusts it to the data
instead of teaching the format from nothing. Validation and held-out questions are never pretrained on.
"""

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer
from litgpt.utils import copy_config_files, save_config

from lit_gpt.data.builtin import generate_examples, split_examples
from lit_gpt.tiny_model import ensure_tiny_checkpoint, pretrain_corpus

# name -> (layers, width); M is the built-in tiny model's shape. Heads of 16-48 wide, MLP 3x the width.
SIZES = {"S": (4, 64), "M": (8, 128), "L": (12, 192)}
QUICK_SIZES = {"S": (2, 32), "M": (2, 64), "L": (3, 64)}
INSTRUCT_SEED = 7  # not Builtin's 42: other draws of the same tasks
CACHE_VERSION = 1  # bump when the pretraining code changes what it produces


@dataclass
class PretrainArgs:
    """Plain next-token pretraining; ``steps`` per size so that each reaches a plateau (see `plateau`)."""

    steps: dict  # size name -> optimizer steps
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    instruct_fraction: float = 0.2
    """Share of the corpus's documents that are train-split instruction examples in the Alpaca prompt format"""
    corpus_size: int = 4000


def size_config(layers: int, width: int) -> Config:
    base = Config.from_file(ensure_tiny_checkpoint() / "model_config.yaml")
    return replace(base, name=f"dropbp-study-{layers}x{width}", n_layer=layers, n_embd=width, n_head=4,
                   n_query_groups=4, intermediate_size=3 * width)


def n_params(config: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def cache_dir_for(cache_dir: Path, name: str, layers: int, width: int, args: PretrainArgs) -> Path:
    """One directory per size and pretraining settings: change either and the model is pretrained again."""
    key = {"layers": layers, "width": width, "version": CACHE_VERSION,
           **{k: v for k, v in asdict(args).items() if k != "steps"}, "steps": args.steps[name]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{name}-{layers}x{width}-{digest}"


def ensure_pretrained(cache_dir: Path, name: str, layers: int, width: int, args: PretrainArgs) -> tuple:
    """(checkpoint dir, whether it was pretrained now): loaded from the cache when there."""
    out_dir = cache_dir_for(cache_dir, name, layers, width, args)
    if (out_dir / "lit_model.pth").is_file():
        return out_dir, False
    pretrain(out_dir, size_config(layers, width), args.steps[name], args.batch_size, args.seq_len, args.lr,
             args.seed, args.instruct_fraction, args.corpus_size)
    return out_dir, True


def corpus_ids(tokenizer: Tokenizer, seed: int, instruct_fraction: float, corpus_size: int) -> torch.Tensor:
    texts = pretrain_corpus(corpus_size, seed)
    if instruct_fraction > 0:
        style = PromptStyle.from_name("alpaca")
        train, _, _ = split_examples(generate_examples(2 * corpus_size, seed=INSTRUCT_SEED))
        n = round(corpus_size * instruct_fraction / (1 - instruct_fraction))
        texts += [style.apply(ex["instruction"], **ex) + ex["output"] for ex in train[:n]]
        random.Random(seed).shuffle(texts)
    return torch.cat([tokenizer.encode(t, bos=True, eos=True) for t in texts]).long()


def pretrain(out_dir: Path, config: Optional[Config] = None, steps: int = 400, batch_size: int = 16,
             seq_len: int = 64, lr: float = 3e-3, seed: int = 0, instruct_fraction: float = 0.0,
             corpus_size: int = 4000) -> Path:
    """Writes a litgpt checkpoint dir (the built-in tokenizer) trained from scratch; config None: the built-in tiny
    model from its checkpoint's initialisation. The loss curve goes to pretrain.json."""
    base = ensure_tiny_checkpoint()
    if (out_dir / "lit_model.pth").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_config_files(base, tmp)
    ids = corpus_ids(Tokenizer(base), seed, instruct_fraction, corpus_size)
    torch.manual_seed(seed)
    if config is None:
        model = GPT(Config.from_file(base / "model_config.yaml"))
        model.load_state_dict(torch.load(base / "lit_model.pth", weights_only=True))
    else:
        model = GPT(config)
        model.apply(model._init_weights)
        save_config(config, tmp)
    losses, seconds = train_steps(model, ids, steps, batch_size, seq_len, lr, seed)
    torch.save(model.state_dict(), tmp / "lit_model.pth")
    (tmp / "pretrain.json").write_text(json.dumps({"steps": steps, "final_loss": losses[-1], "seconds": seconds,
                                                   "loss_curve": losses[:: max(1, steps // 50)],
                                                   "plateau": plateau(losses)}))
    tmp.rename(out_dir)
    return out_dir


def train_steps(model: GPT, ids: torch.Tensor, steps: int, batch_size: int, seq_len: int, lr: float,
                seed: int) -> tuple:
    """AdamW, 20 warm-up steps, cosine to 0; returns the loss of every step and the seconds taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=g)
        batch = torch.stack([ids[s: s + seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    return losses, time.perf_counter() - t0


def plateau(losses: list) -> Optional[float]:
    """Relative fall of the mean loss from the second-last to the last tenth of pretraining: near 0 when the model
    has stopped learning from this corpus (the "pretrained enough" criterion the report states)."""
    n = len(losses) // 10
    if n == 0:
        return None
    last, before = sum(losses[-n:]) / n, sum(losses[-2 * n: -n]) / n
    return (before - last) / before
