"""Integrations of the torch-only DropBP core with other frameworks (optional extras).

- :mod:`dropbp.integrations.transformers`: Hugging Face Transformers models (+ PEFT) and the ``Trainer``
  (``pip install -e ".[hf]"``).

Nothing is imported here, so ``import dropbp`` never needs an optional dependency.
"""
