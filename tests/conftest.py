import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# `make test` runs two pytest workers (pytest-xdist) on a 2-core machine: one torch thread each, since more threads
# than free cores makes CPU torch many times slower; a single pytest process takes both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The slowest modules first: `make test` hands whole modules to its pytest-xdist workers in collection order (--dist
# loadfile), and one of them started last would run alone at the end while the other core idles. test_distributed
# starts the two-process launch (the `two_processes` fixture) at once; the other modules that read it come after
# several minutes of other work, so that no worker waits for it.
SLOW_MODULES = ["test_distributed.py", "test_recipes.py", "test_hf_compile.py", "test_compile.py", "test_faults.py",
                "test_benchmark.py", "test_learning.py", "test_lora_study.py", "test_eval.py"]


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(SLOW_MODULES)))  # stable: the rest keep their order


# one tiny config per block layout litgpt has (real model families, shrunk)
TINY = dict(n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=64, padded_vocab_size=64)
LAYOUTS = {
    "llama": dict(name="Llama-2-7b-hf", intermediate_size=64, n_query_groups=4),  # sequential, pre-norm
    "pythia": dict(name="pythia-14m"),  # parallel residual, separate norms
    "falcon": dict(name="falcon-7b", n_query_groups=1),  # parallel residual, shared attention norm
    "phi": dict(name="phi-2", intermediate_size=64),  # parallel residual, shared norm, partial rotary
    "gemma2": dict(name="gemma-2-2b", intermediate_size=64, n_query_groups=2, head_size=8),  # post-branch norms
}


def tiny_config(layout: str, config_class: type = None, **overrides):
    """A tiny litgpt ``Config`` (or ``config_class``) of the given block layout. litgpt is imported here, not at
    the top: the Transformers integration's tests also run in an environment without it."""
    if config_class is None:
        from litgpt.config import Config as config_class
    spec = dict(LAYOUTS[layout])
    name = spec.pop("name")
    return config_class.from_name(name, **{**TINY, **spec, **overrides})


@pytest.fixture
def one_thread():
    """For tests whose subprocesses take both cores: more torch threads than free cores makes CPU torch many
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, worker_id) -> Path:
    """The records of every two-process case of the suite, from one launch (tests/two_processes.py; 3 to 4 minutes
    on 2 busy cores). Under pytest-xdist the first worker to ask launches it and the others wait for it: the launch
    takes both cores anyway."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # shared by the workers
    out_dir = root / "two_processes"
    with FileLock(str(root / "two_processes.lock")):
        if not (out_dir / "returncode").exists():
            out_dir.mkdir(exist_ok=True)
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("two_processes.py")), str(out_dir)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                  timeout=1200)
            (out_dir / "stdout.txt").write_text(proc.stdout)
            (out_dir / "stderr.txt").write_text(proc.stderr)
            (out_dir / "returncode").write_text(str(proc.returncode))
    assert (out_dir / "returncode").read_text() == "0", (out_dir / "stderr.txt").read_text()[-4000:]
    return out_dir
