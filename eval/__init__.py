"""Evaluation of Lit-GPT checkpoints with lm-evaluation-harness, and the DropBP paper's Table-1 layout."""
