"""DropBP with the Hugging Face Trainer: LoRA (PEFT) fine-tuning of a Transformers LLaMA, offline.

A complete run on the project's built-in instruction data, with the built-in tokenizer and a small random-init
``LlamaConfig`` model (no hub download). Needs the hf extra: ``pip install -e ".[hf]"``. From the repository root:

    python examples/hf_trainer.py                      # LoRA, p = 0.875, 60 optimizer steps
    python examples/hf_trainer.py --rate 0             # the baseline, for comparison
    python examples/hf_trainer.py --method full --gradient_checkpointing

With a real model, replace ``build_model`` by ``AutoModelForCausalLM.from_pretrained(...)`` and the tokenizer by
``AutoTokenizer.from_pretrained(...)``: the DropBP part (install_gates, DropBPHandler, DropBPCallback) is the same.
"""

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's lit_gpt and dropbp, installed or not

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
    from litgpt.prompts import Alpaca
except ModuleNotFoundError as error:  # run outside the fork's .venv: what to install, in one line
    hint = (f'pip install "{ROOT}[hf]"' if importlib.util.find_spec("litgpt")
            else f"run it in the fork's environment (make install in {ROOT}, then {ROOT / '.venv/bin/python'})")
    print(f"error: examples/hf_trainer.py needs {error.name}: {hint}", file=sys.stderr)
    sys.exit(2)

from dropbp import DropBPHandler  # noqa: E402
from dropbp.integrations.transformers import DropBPCallback, install_gates  # noqa: E402
from lit_gpt.data.builtin import generate_examples, split_examples  # noqa: E402
from lit_gpt.tiny_model import ensure_tiny_checkpoint  # noqa: E402


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The project's built-in byte-level BPE tokenizer (created offline on first use)."""
    path = ensure_tiny_checkpoint() / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tokenize(examples: list, tokenizer, max_len: int) -> list:
    """Alpaca prompt + answer + EOS; the loss is on the answer only (prompt labels -100)."""
    style, samples = Alpaca(), []
    for ex in examples:
        prompt = [tokenizer.bos_token_id] + tokenizer(style.apply(ex["instruction"], input=ex["input"]))["input_ids"]
        answer = tokenizer(ex["output"])["input_ids"] + [tokenizer.eos_token_id]
        samples.append({
            "input_ids": (prompt + answer)[:max_len],
            "labels": ([-100] * len(prompt) + answer)[:max_len],
        })
    return samples


class Collator:
    """Pads a batch to its longest sample (right padding, masked out of attention and loss)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list) -> dict:
        width = max(len(s["input_ids"]) for s in batch)

        def pad(seq, value):
            return seq + [value] * (width - len(seq))

        return {
            "input_ids": torch.tensor([pad(s["input_ids"], self.pad_id) for s in batch]),
            "attention_mask": torch.tensor([pad([1] * len(s["input_ids"]), 0) for s in batch]),
            "labels": torch.tensor([pad(s["labels"], -100) for s in batch]),
        }


def build_model(vocab_size: int, args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.n_embd, intermediate_size=args.n_embd * 3,
        num_hidden_layers=args.n_layer, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.max_len, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=0.875, help="target drop rate (FLOPs-weighted mean)")
    parser.add_argument("--sampling", choices=("fixed", "bernoulli"), default="fixed")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 for LoRA, 1e-3 for full")
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--sensitivity_at", type=float, default=0.1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--out_dir", default="out/hf_trainer")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    t0 = time.perf_counter()

    tokenizer = load_tokenizer()
    train, val, _ = split_examples(generate_examples(args.num_samples, seed=args.seed))
    train_set, val_set = tokenize(train, tokenizer, args.max_len), tokenize(val, tokenizer, args.max_len)

    model = build_model(len(tokenizer), args)
    install_gates(model, seq_len=args.max_len)  # a gate on every attention and MLP branch; forward unchanged
    if args.method == "lora":
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    handler = DropBPHandler(model, rate=args.rate, sampling=args.sampling, seed=args.seed)
    callback = DropBPCallback(handler, sensitivity_at=args.sensitivity_at)

    training_args = TrainingArguments(
        output_dir=args.out_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr or (3e-3 if args.method == "lora" else 1e-3), lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 10, logging_steps=10, eval_strategy="no", save_strategy="steps",
        save_steps=args.max_steps // 2, save_total_limit=1, report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=Collator(tokenizer.eos_token_id))
    callback.attach(trainer)  # first callback: reporting integrations see drop_rate too
    result = trainer.train()
    val_loss = trainer.evaluate()["eval_loss"]

    drops = [e["drop_rate"] for e in trainer.state.log_history if "drop_rate" in e]
    print(f"\ntrain loss {result.training_loss:.3f}, validation loss {val_loss:.3f} (ppl {math.exp(val_loss):.1f})")
    print(f"realised drop rate (mean of the logged windows) {sum(drops) / max(1, len(drops)):.3f}, target {args.rate}")
    if callback.report is not None:
        rates = {(b["layer"], b["kind"]): b["rate"] for b in callback.report["branches"]}
        print(f"sensitivity allocation after step {callback.report['step']} ({callback.report['metric']},"
              f" {callback.report['seconds']:.1f}s), FLOPs-weighted mean {callback.report['mean_rate']:.3f}:")
        for kind in ("attn", "mlp"):
            by_layer = [f"{r:.1f}" for (_, k), r in sorted(rates.items()) if k == kind]
            print(f"  {kind:4s} rates by layer: " + " ".join(by_layer))
        print(f"  written to {Path(args.out_dir) / 'dropbp_allocation.json'}")
    summary = {"train_loss": result.training_loss, "val_loss": val_loss, "seconds": time.perf_counter() - t0}
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds']:.0f}s; checkpoints (with the DropBP state) in {args.out_dir}")


if __name__ == "__main__":
    main()
