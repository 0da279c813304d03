# Two commands on a fresh machine:  make demo   |   make test
# Both create .venv (Python 3.10+), install the locked dependency set (requirements/lock.txt:
# the CPU build of torch 2.13.0 and every other package pinned) and qcompile, then run the
# main job or the test suite.
#
#   make test-all      the whole suite, the tests marked slow included (the wider architecture zoo)
#   make lock          refresh requirements/lock.txt with today's newest releases
#   make test-latest   the suite against the newest releases of every dependency (.venv-latest)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcompile-installed
LOCK := requirements/lock.txt
# An unpinned torch pulls a multi-GB CUDA build: the newest-release runs pin this CPU build.
TORCH_VERSION ?= 2.13.0
LATEST ?= .venv-latest
# pytest's console script (not `python -m pytest`): it puts no folder of the repository on
# sys.path, where kernels/ would shadow an installed `kernels` package (see pyproject.toml).
PYTEST_ARGS ?= -q -n 2 --dist loadfile --no-loadscope-reorder
# --no-loadscope-reorder: files in the order tests/conftest.py gives (the long ones first).
# `make test` (the README's test command, what CI runs) leaves out the tests marked slow
# (pyproject.toml); `make test-all` runs them too.
FAST := -m "not slow"

.PHONY: setup demo test test-all test-latest lock bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qcompile demo

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS) $(FAST)

test-all: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Today's newest releases of every dependency (torch pinned to the CPU build above), in a
# virtual environment of their own, made anew on every run.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager "torch==$(TORCH_VERSION)" -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format freeze | grep -iE '^(torch|transformers|onnx|onnxruntime.*|onnxscript|triton|kernels)=='
	$(LATEST)/bin/pytest $(PYTEST_ARGS)

# Refresh the lock: resolve today's newest releases in a throw-away environment and pin them.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)" -e ".[dev]"
	.venv-lock/bin/python requirements/refresh_lock.py .venv-lock/bin/python
	rm -rf .venv-lock

bench: $(STAMP)
	$(PY) benchmarks/minilm_cpu.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build *.egg-info .pytest_cache
