import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# inductor compiles in this process, not in a pool of worker processes that each import torch again (10 s of CPU a
# compiling test on 2 cores, where the other core runs the other pytest worker anyway); inherited by the tests'
# subprocesses. Set before torch is imported: inductor reads it once
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

# `make test` runs two pytest workers (pytest-xdist) on a 2-core machine: one torch thread each, since more threads
# than free cores makes CPU torch many times slower; a single pytest process takes both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The slowest modules first: `make test` hands whole modules to its pytest-xdist workers in collection order (--dist
# loadfile --no-loadscope-reorder), and one of them started last would run alone at the end while the other core
# idles. The two-process launch starts with the session (`start_two_processes`); test_distributed, which only reads
# its records, comes last.
SLOW_MODULES = ["test_recipes.py", "test_hf_compile.py", "test_compile.py", "test_faults.py", "test_benchmark.py",
                "test_learning.py", "test_lora_study.py", "test_eval.py"]
LAST_MODULES = ["test_distributed.py"]


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_MODULES + [None] + LAST_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_MODULES)))  # stable: the rest keep their order


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


def two_processes_dir(tmp_path_factory, worker_id) -> Path:
    root = tmp_path_factory.getbasetemp()
    return (root if worker_id == "master" else root.parent) / "two_processes"  # shared by the pytest-xdist workers


@pytest.fixture(scope="session", autouse=True)
def start_two_processes(request, tmp_path_factory, worker_id):
    """Start the suite's one two-process launch (tests/two_processes.py; 2 to 4 minutes on 2 busy cores) in the
    background as soon as a session that reads it begins, so that no worker sits idle waiting for it. The first
    worker starts it; it writes `returncode` when done."""
    if not any("two_processes" in item.fixturenames for item in request.session.items):
        return
    from filelock import FileLock

    out_dir = two_processes_dir(tmp_path_factory, worker_id)
    with FileLock(str(out_dir.parent / "two_processes.lock")):
        if not out_dir.exists():
            out_dir.mkdir()
            # a shell of its own writes the status: the worker that started it may be shut down before it ends
            record = 'OMP_NUM_THREADS=1 "$0" "$1" "$2" > "$2/stdout.txt" 2> "$2/stderr.txt"; echo $? > "$2/rc.tmp"' \
                     ' && mv "$2/rc.tmp" "$2/returncode"'
            subprocess.Popen(["bash", "-c", record, sys.executable, str(Path(__file__).with_name("two_processes.py")),
                              str(out_dir)], start_new_session=True)


@pytest.fixture(scope="session")
def two_processes(start_two_processes, tmp_path_factory, worker_id) -> Path:
    """The records of every two-process case of the suite, from the one launch (`start_two_processes`)."""
    returncode = two_processes_dir(tmp_path_factory, worker_id) / "returncode"
    deadline = time.monotonic() + 1200
    while not returncode.exists():
        assert time.monotonic() < deadline, "the two-process launch did not end in 20 minutes"
        time.sleep(0.5)
    assert returncode.read_text().strip() == "0", (returncode.parent / "stderr.txt").read_text()[-4000:]
    return returncode.parent
