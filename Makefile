# The project's commands. Every install step lives here so that a fresh clone works.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast bench proto lint clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU build this machine has on disk; an
# unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,mlflow,ray,bench]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/spotwise demo

test: setup
	$(PY) -m pytest -q

# The same suite without the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -q --skip-slow

bench: setup
	$(PY) bench/checkpoint.py
	$(PY) bench/recovery.py
	$(PY) bench/goodput.py
	$(PY) bench/scale.py
	$(PY) bench/watchers.py
	$(PY) bench/ray_recovery.py

proto: setup
	$(PY) -m spotwise.proto.build

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
