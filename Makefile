# `make test` and `make demo` create .venv on first use. torch is pinned in the same pip command so that pip
# takes the CPU build on a CPU machine instead of pulling a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,hf]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

# the demo's own out_dir, replaced on every run: `make demo` runs again; a run of yours elsewhere is never touched
demo: install
	$(PY) finetune/lora.py --dropbp.rate 0.875 --out_dir out/demo --overwrite true

clean:
	rm -rf $(VENV) out
