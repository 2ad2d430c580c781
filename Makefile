# Two entry points on a fresh machine with only python3:
#   make demo   installs everything into .venv/ and builds the bundled sample crawl
#   make test   installs everything into .venv/ and runs lint and the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pairmill demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/pytest -n 2 -q

# The slow and GPU-marked tests too (GPU ones skip themselves without a GPU).
test-all: $(STAMP)
	$(BIN)/pytest -n 2 -q -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/encoder_efficiency.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
