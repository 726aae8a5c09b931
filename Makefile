# The README's two commands: `make demo` and `make test`. Both create .venv and install
# everything from the pinned requirements; re-running them reuses the environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
export MAX_JOBS ?= 2

.PHONY: demo test install clean bench cmake-build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel

$(VENV)/.installed: $(BIN)/python requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/saeengine demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n auto --durations=20 tests

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run_benchmarks.py

cmake-build: $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build -G Ninja -DPython_EXECUTABLE=$(abspath $(BIN)/python) && cmake --build build

clean:
	rm -rf $(VENV) build *.egg-info saeengine/_C*.so
