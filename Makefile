# `make test` and `make demo` create .venv on first use. torch is pinned in the same install command so that the CPU
# build is taken on a CPU machine instead of a multi-GB CUDA build. uv installs in seconds what pip takes minutes
# for; it is told pip's find-links (where a machine may keep its CPU build of torch), which it does not read itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HF_VENV := .venv-hf
HF_PY := $(HF_VENV)/bin/python
TORCH := torch==2.13.0
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV = $(if $(FIND_LINKS),UV_FIND_LINKS="$(FIND_LINKS)") $(1)/bin/uv pip install --quiet --python $(1)/bin/python
# uv installs no bytecode, and a machine that sets PYTHONDONTWRITEBYTECODE then never caches it: every process of the
# tests would compile torch's, litgpt's and Transformers' sources again (`import litgpt`: 39 s instead of 14 s).
# The first import writes it (only what is imported: 4,300 files where uv's --compile-bytecode takes 17,000 and 3
# minutes of CPU)
export PYTHONDONTWRITEBYTECODE :=
# pytest-xdist workers: the suite is mostly single-threaded Python, imports and process start-ups. --dist loadfile
# keeps a module's tests on one worker, so that a module's fixture (a study, a checkpoint) runs once, and
# --no-loadscope-reorder hands them out in tests/conftest.py's order (slowest first), not by number of tests; the
# integration's tests spread one by one (its compile tests in one module would run alone on one core)
WORKERS ?= 2

.PHONY: install test test-fork test-hf demo clean

# the fork's environment: every version from the lock (constraints.txt)
$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt uv
	$(call UV,$(VENV)) -c constraints.txt "$(TORCH)" -r requirements.txt -e ".[hf,test]"
	touch $@

# the library alone, as a Transformers user installs it: no litgpt, and the newest transformers, peft and
# accelerate that the package index serves (the fork's environment above holds the oldest supported ones)
$(HF_VENV)/.installed: pyproject.toml
	test -x $(HF_PY) || $(PYTHON) -m venv $(HF_VENV)
	$(HF_PY) -m pip install --quiet -c constraints.txt uv
	$(call UV,$(HF_VENV)) --upgrade "$(TORCH)" ".[hf,test]"
	touch $@

install: $(VENV)/.installed

# the two environments' tests side by side (their output kept apart): the suite leaves a core idle while it waits on
# its multi-process tests, and the second environment's install waits on the network
test:
	$(MAKE) -j2 --output-sync=target test-fork test-hf

test-fork: install
	$(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

# the integration's tests against the installed library; among them the plain-loop example runs outside the checkout
# (tests/test_hf_standalone.py), so that it imports the installed dropbp
test-hf: $(HF_VENV)/.installed
	$(call UV,$(HF_VENV)) --reinstall --no-deps .
	$(HF_PY) -m pytest -n $(WORKERS) --durations=20 $(wildcard tests/test_hf*.py)

# the demo's own out_dir, replaced on every run: `make demo` runs again; a run of yours elsewhere is never touched
demo: install
	$(PY) finetune/lora.py --dropbp.rate 0.875 --out_dir out/demo --overwrite true

clean:
	rm -rf $(VENV) $(HF_VENV) out
