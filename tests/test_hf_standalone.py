"""The `dropbp` library as a Transformers user installs it: the version range it supports, what the distribution
holds, and the plain-loop example (no Trainer, no litgpt). `make test-hf` runs these (and tests/test_hf*.py) in an
environment with the newest transformers, peft and accelerate and without litgpt; `make test-fork` with the oldest."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
pytest.importorskip("peft", reason="the hf extra is not installed (pip install -e '.[hf]')")

from dropbp.integrations.transformers import layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_range_is_the_one_the_integration_enforces():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hf = {req.split(">")[0].split("<")[0].split("=")[0]: req for req in project["optional-dependencies"]["hf"]}
    assert hf["transformers"] == "transformers" + layout.TRANSFORMERS_VERSIONS
    assert not any("==" in req for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []))


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "5.2.0"])
def test_a_transformers_outside_the_range_is_refused_in_one_line(version):
    with pytest.raises(ImportError) as error:
        layout.check_transformers_version(version)
    assert "\n" not in str(error.value) and version in str(error.value) and "pip install" in str(error.value)


@pytest.mark.parametrize("version", ["5.3.0", "5.25.0", "5.30.0.dev0"])
def test_releases_in_the_range_are_accepted(version):
    layout.check_transformers_version(version)


def test_the_distribution_is_the_library_only():
    """`pip install .` installs the package `dropbp` only: not the fork's lit_gpt, finetune, eval or scripts."""
    dist = importlib.metadata.distribution("dropbp")
    assert dist.read_text("top_level.txt").split() == ["dropbp"]
    requires = dist.requires or []
    assert not any(r.startswith(("litgpt", "lightning")) for r in requires)


def test_plain_loop_example_trains_without_litgpt(tmp_path):
    """The README's own-loop example, in a fresh process that must never import litgpt: it learns (exit 0: LoRA
    weights moved and the loss fell)."""
    code = (
        "import runpy, sys; sys.argv = ['plain_loop.py', '--steps', '30'];"
        f" runpy.run_path({str(ROOT / 'examples' / 'plain_loop.py')!r}, run_name='__main__')"
    )
    guard = "import sys, atexit; atexit.register(lambda: print('LITGPT_IMPORTED', 'litgpt' in sys.modules));"
    run = subprocess.run([sys.executable, "-c", guard + code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # the other cores are busy
    assert run.returncode == 0, run.stderr[-3000:]
    moved = int(run.stdout.split("LoRA tensors moved: ")[1].split(" of ")[0])
    assert moved > 24, run.stdout  # at p = 0.875 a branch may stay dropped through 30 steps: most are kept once
    assert "LITGPT_IMPORTED False" in run.stdout


HIDE_TRANSFORMERS = """
import sys

class Hide:  # as if transformers were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
"""


@pytest.mark.parametrize("example", ["hf_trainer.py", "plain_loop.py"])
def test_an_example_without_transformers_says_what_to_install(tmp_path, example):
    run = f"import runpy; runpy.run_path({str(ROOT / 'examples' / example)!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", HIDE_TRANSFORMERS + run], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.count("\n") == 1 and err.startswith(f"error: examples/{example} needs transformers: ")
    if importlib.util.find_spec("litgpt"):  # else (the library's environment) hf_trainer.py names the fork's
        assert err.endswith(f': pip install "{ROOT}[hf]"\n')
