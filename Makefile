# Each target creates .venv when missing, installs the package into it, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,demo,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlp demo
	$(VENV)/bin/vlp demo --recipe lit-minilm-emoji

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# Everything but the tests marked slow (end-to-end training, demo-like runs): for quick checks while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) tools/bench_train.py --out results/bench_train.json

clean:
	rm -rf $(VENV) runs results
