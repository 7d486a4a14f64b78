# The README's two commands. Each sets itself up on a fresh machine that has only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installs the demo's corpus (Python's documentation, a Debian package); fails without root/apt.
INSTALL_DATA ?= bash scripts/install_data.sh
PYDOCS ?= /usr/share/doc/python3.11/html/_sources

.PHONY: demo test lint data reproduce

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The default corpus is Python's documentation, installed from Debian's packages (DATA.md).
data:
	@$(INSTALL_DATA)

# MoE vs Engram vs dense on pydocs. Where pydocs cannot be installed (no root, not Debian), says
# so and trains on the standard library's source instead (README: what to expect then).
demo: $(VENV)/.installed
	@if $(INSTALL_DATA) || test -d $(PYDOCS); then corpus=pydocs; else corpus=stdlib; \
	  echo "make demo: the pydocs corpus could not be installed (see above); training on the" \
	    "standard library's source instead (--train.data=stdlib): losses are not comparable" \
	    "to the README's table (README, 'Measured')" >&2; fi; \
	$(BIN)/engramlm compare --train.data=$$corpus

# The paper's experiments in miniature (docs/results.md): each one about 30 minutes on 2 CPU cores.
reproduce: $(VENV)/.installed data
	$(BIN)/engramlm experiment all

# Needs neither root nor the corpus: the tests read the standard library's source.
test: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks recipes
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks recipes
	$(BIN)/ruff format --check src tests benchmarks recipes
