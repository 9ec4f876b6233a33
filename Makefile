# One-command set-up. CPU machines get the CPU build of torch through constraints-cpu.txt;
# on a GPU machine run `make install CONSTRAINTS=` after installing your own torch.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= -c constraints-cpu.txt
BIN := $(VENV)/bin

.PHONY: install quickstart test-unit test test-slow test-all lint

$(BIN)/raylign: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	touch $(BIN)/raylign

install: $(BIN)/raylign

quickstart: install
	$(BIN)/raylign quickstart

# tests/unit only, and no Ray: tests that use the ray_session fixture are marked `ray` (tests/conftest.py).
test-unit: install
	$(BIN)/python -m pytest tests/unit -m "not slow and not ray" -q

test: install
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

test-slow: install
	$(BIN)/python -m pytest -m slow -q -s

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
