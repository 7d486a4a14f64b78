# The README's two commands. Each sets itself up on a fresh machine that has only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint data reproduce

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The default corpus is Python's documentation, installed from Debian's packages (DATA.md).
data:
	@bash scripts/install_data.sh

demo: $(VENV)/.installed data
	$(BIN)/engramlm compare

# The paper's experiments in miniature (docs/results.md): each one about 30 minutes on 2 CPU cores.
reproduce: $(VENV)/.installed data
	$(BIN)/engramlm experiment all

test: $(VENV)/.installed data
	$(BIN)/ruff check src tests benchmarks recipes
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks recipes
	$(BIN)/ruff format --check src tests benchmarks recipes
