# The README's two commands: `make run` (set up + main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On these machines `torch==2.13.0` resolves to a CPU wheel on local disk; elsewhere pip picks the build for the
# platform. Override with `make TORCH=torch==X.Y.Z` (a bare `torch` would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?= -n 2

.PHONY: setup run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/medlens run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
