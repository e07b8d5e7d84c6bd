"""DropBP in your own PyTorch loop: a Transformers LLaMA with PEFT LoRA, no Trainer, no litgpt.

Needs only the library: ``pip install ".[hf]"`` from a checkout. Runs offline on a CPU in seconds (a small random
model learns to count: each token is the previous one plus one), and says whether the LoRA weights moved:

    python examples/plain_loop.py                 # p = 0.875, sensitivity allocation after 10% of the steps
    python examples/plain_loop.py --rate 0        # the baseline

The DropBP part is four calls: ``install_gates`` on the model, a ``DropBPHandler`` over it, ``handler.sample()``
before every forward (one mask per micro-batch), and, once after 10% of the steps, the sensitivity pass and
``allocate_rates``. A mask may drop every branch that holds a trainable weight (LoRA on some modules only): the
loss then has no graph and the step is skipped. With a real model use
``AutoModelForCausalLM.from_pretrained(...)``; the rest is the same.
"""

import argparse
import sys
import tempfile
from pathlib import Path

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dropbp import DropBPHandler, allocate_rates, compute_sensitivity
    from dropbp.integrations.transformers import install_gates, set_gate_flops
except ModuleNotFoundError as error:  # the library or its hf extra is not installed: what to install, in one line
    print(f'error: examples/plain_loop.py needs {error.name}: pip install "{Path(__file__).resolve().parents[1]}[hf]"',
          file=sys.stderr)
    sys.exit(2)

VOCAB, LENGTH = 64, 32


def counting_batch(generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """Rows of consecutive tokens (mod the vocabulary) from random starts."""
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=generator)
    return (start + torch.arange(LENGTH)) % VOCAB


def main(rate: float = 0.875, steps: int = 60, batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=LENGTH)
    model = LlamaForCausalLM(config)
    install_gates(model, seq_len=LENGTH)  # a DropBPGate on every attention and MLP branch
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    handler = DropBPHandler(model, rate=rate, seed=seed)  # the same seed on every rank: the same masks
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data, probe = torch.Generator().manual_seed(seed), counting_batch(torch.Generator().manual_seed(-1), batch_size)
    losses = []
    for step in range(steps):
        if step == max(1, steps // 10) and rate > 0:  # the paper: re-allocate the rates by sensitivity at 10%
            sensitivity = compute_sensitivity(handler, model, lambda: model(input_ids=probe, labels=probe).loss)
            set_gate_flops(model, LENGTH)
            handler.set_rates(allocate_rates(sensitivity.tolist(), handler.flops.tolist(), target=rate))
        handler.sample()  # this micro-batch's mask, drawn before its forward
        batch = counting_batch(data, batch_size)
        loss = model(input_ids=batch, labels=batch).loss
        if loss.requires_grad:  # False when every branch holding a trainable parameter was dropped: nothing to do
            loss.backward()  # no gradient through dropped branches: their parameters keep grad None
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    handler.keep_all()  # inference: every layer's own forward
    moved = sum(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model, Path(tmp) / "model.pt")  # a gated model pickles like any other
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"DropBP p={rate}: loss {first:.3f} -> {last:.3f} (mean of the first and the last 5 steps),"
          f" mean drop rate {handler.mean_rate:.3f}, LoRA tensors moved: {moved} of {len(lora)}")
    return {"losses": losses, "moved": moved, "learned": moved > 0 and last < first}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.875)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    result = main(rate=args.rate, steps=args.steps)
    sys.exit(0 if result["learned"] else 1)  # a run that learned nothing is a failure
