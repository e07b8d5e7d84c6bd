"""Write the held-out split of the built-in instruction data as local lm-eval tasks.

    python eval/builtin_task.py --out_dir out/builtin_tasks
    python eval/evaluate.py --checkpoint_dir out/finetune/lora/final --tasks out/builtin_tasks

The questions are the ones `lit_gpt.data.builtin.Builtin` (with the same seed and size) never trains on, prompted in
the fine-tuning prompt style. Two tasks over them:

- ``builtin_qa``: the answer generated greedily (until a newline), scored by exact match;
- ``builtin_qa_loglik``: the log-likelihood of the true answer after the prompt, as perplexity (lower is better)
  and acc (the answer is exactly what greedy decoding produces).
"""

import json
import sys
from pathlib import Path
from typing import Optional

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root

import yaml
from jsonargparse import CLI

from lit_gpt.data.builtin import Builtin


def write_builtin_tasks(
    out_dir: Path = Path("out/builtin_tasks"),
    seed: int = Builtin.seed,
    num_samples: int = Builtin.num_samples,
    prompt_style: str = "alpaca",
    max_examples: Optional[int] = None,
) -> list[str]:
    """Write the built-in data's held-out questions as lm-eval tasks; returns the task names.

    Args:
        out_dir: Where the task YAMLs and their JSONL data go (pass this directory to eval/evaluate.py --tasks).
        seed: Seed of the built-in data, as given to fine-tuning (--data.seed).
        num_samples: Number of generated examples, as given to fine-tuning (--data.num_samples).
        prompt_style: Prompt style used in fine-tuning.
        max_examples: Keep at most this many held-out questions.
    """
    data = Builtin(seed=seed, num_samples=num_samples, prompt_style=prompt_style)
    examples = data.test_examples()[:max_examples]
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = (out_dir / "builtin_test.jsonl").resolve()
    docs = [{"prompt": data.prompt_style.apply(ex["instruction"], **ex), "answer": ex["output"]} for ex in examples]
    data_path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))

    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
    }
    tasks = {
        "builtin_qa": {
            "output_type": "generate_until",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "builtin_qa_loglik": {
            "output_type": "loglikelihood",
            "target_delimiter": "",  # the prompt ends with the newline the answer follows
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
        },
    }
    for name, config in tasks.items():
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **config}, sort_keys=False))
    print(f"Wrote {len(docs)} held-out questions as tasks {', '.join(tasks)} to {out_dir}")
    return list(tasks)


if __name__ == "__main__":
    CLI(write_builtin_tasks, as_positional=False)
