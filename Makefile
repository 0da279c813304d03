# Two commands on a fresh machine:  make demo   |   make test
# Both create .venv (Python 3.10+), install the CPU build of torch 2.13.0 and qcompile with
# its dev extra, then run the main job or the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcompile-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qcompile demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/minilm_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
