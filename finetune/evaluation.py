"""Validation loss (every branch kept) and the sample answer printed at each validation."""

import random
from typing import Callable

import torch
from litgpt.args import EvalArgs
from litgpt.utils import chunked_cross_entropy

from finetune.cli import UsageError
from finetune.data_setup import validation_split


class Example:
    """litgpt's sample generation at each validation (`--eval.evaluate_example`, `--eval.max_new_tokens`): one
    record of the validation split (else the training split), prompted with its input too, answered by sampling
    at temperature 0.8 under a forked RNG, so that generating never changes the training run."""

    def __init__(self, tokenizer, data, eval: EvalArgs) -> None:
        self.tokenizer, self.prompt_style, self.max_new_tokens = tokenizer, data.prompt_style, eval.max_new_tokens
        records = validation_split(data).data or data.train_dataset.data
        choice = eval.evaluate_example
        if isinstance(choice, str) and choice.isdigit():  # jsonargparse reads `--eval.evaluate_example 3` as "3"
            choice = int(choice)
        if choice == "first":
            choice = 0
        elif choice == "random":
            choice = random.Random(len(records)).randrange(len(records))  # fixed, so every rank picks the same
        elif not isinstance(choice, int) or not 0 <= choice < len(records):
            raise UsageError(f"--eval.evaluate_example must be first, random or an index below {len(records)},"
                             f" got {eval.evaluate_example!r}")
        self.record = records[choice]

    @torch.no_grad()
    def generate(self, fabric, model, write: Callable[[str], None]) -> None:
        if not self.max_new_tokens:
            return
        from litgpt.generate.base import generate

        prompt = self.prompt_style.apply(self.record["instruction"], input=self.record.get("input", ""))
        encoded = self.tokenizer.encode(prompt, device=fabric.device)
        max_returned = len(encoded) + self.max_new_tokens
        if max_returned > model.max_seq_length:
            write(f"example not generated: its prompt ({len(encoded)} tokens) + --eval.max_new_tokens"
                  f" {self.max_new_tokens} exceed the training length {model.max_seq_length}")
            return
        model.eval()
        with rng_untouched(fabric):
            with fabric.init_tensor():
                model.set_kv_cache(batch_size=1)
            output = generate(model, encoded, max_returned_tokens=max_returned, temperature=0.8,
                              eos_id=self.tokenizer.eos_id)
            model.clear_kv_cache()
        model.train()
        if fabric.global_rank == 0:
            write(f"{self.record['instruction']} -> {self.tokenizer.decode(output[len(encoded):])!r}")


def rng_untouched(fabric):
    """Torch's RNGs are put back after the block: validating or generating a sample never changes training."""
    return torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else [])


@torch.no_grad()
def validate(fabric, model, val_loader, max_iters: int, pld_handler=None) -> float:
    """Validation loss with every branch kept (DropBP never changes the forward; PLD is switched off). Starting the
    loader draws its workers' seed from the global RNG: put back, so --eval.interval never changes the losses."""
    model.eval()
    if pld_handler is not None:
        pld_handler.disable()
    losses = []
    with rng_untouched(fabric):
        for k, batch in enumerate(val_loader):
            if k >= max_iters:
                break
            logits = model(batch["input_ids"])
            losses.append(chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:], chunk_size=0))
    model.train()
    val_loss = torch.stack(losses).mean()
    return fabric.all_reduce(val_loss, reduce_op="mean").item()
