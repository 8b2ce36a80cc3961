# The project's commands. Every install step lives here so that a fresh clone works.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
STAMP   := $(VENV)/.installed
# The project's own modules compiled once: every daemon, agent and rank the tests start imports
# them, and where PYTHONDONTWRITEBYTECODE is set (as in this project's CI image) each process
# would compile them again (about 0.1 s each). Python checks a .pyc against its source, so a
# stale one is never used.
COMPILE := $(PY) -m compileall -q -x '/\.venv/|/build/' .

.PHONY: setup setup-lab setup-os demo test test-fast bench proto lint clean

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

# The fault lab's OS tools (tests/lab, bench/chaos.py): network namespaces (iproute2), iptables
# and tc. Root only; skipped when they are installed already. `make demo` needs none of it.
LAB_TOOLS := ip iptables tc
setup-lab:
	@if [ "$$(id -u)" != 0 ]; then echo "setup-lab: needs root"; exit 1; fi
	@for t in $(LAB_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update && apt-get install -y iptables iproute2; fi

# Prometheus, for the dashboard's end-to-end test (tests/e2e/test_observe_e2e.py: a real one
# scrapes a real daemon and agents and answers every panel's query). Root only; skipped when
# it is installed already.
setup-os:
	@if [ "$$(id -u)" != 0 ]; then echo "setup-os: needs root"; exit 1; fi
	@command -v prometheus >/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

# As root (CI) the lab's tools and Prometheus are installed first, so the lab's tests and the
# dashboard's run (they fail, not skip, when root lacks them); as another user they skip with
# the reason.
test: setup
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory setup-lab setup-os; fi
	@$(COMPILE)
	$(PY) -m pytest -q --durations=15

# The same suite without the slow end-to-end tests.
test-fast: setup
	@$(COMPILE)
	$(PY) -m pytest -q --skip-slow --durations=15

bench: setup
	$(PY) bench/checkpoint.py
	$(PY) bench/recovery.py
	$(PY) bench/goodput.py
	$(PY) bench/budget.py
	$(PY) bench/scale.py
	$(PY) bench/watchers.py
	$(PY) bench/ray_recovery.py
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory setup-lab && $(PY) bench/chaos.py; \
	else echo "bench/chaos.py skipped: the fault lab needs root"; fi

proto: setup
	$(PY) -m spotwise.proto.build

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
