# The two commands of README.md:  `make demo` (set-up + nightly on demo data)  and  `make test`.
# `make lint` (ruff + mypy) and `make docs` (docs/configuration.md from the config schema) for development.
# Both build .venv on first use and reuse it after; the stamp file tracks the requirements.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR ?= demo
DEMO_LIMIT ?= 10000
CONF ?= conf/local.yaml

.PHONY: demo test lint docs venv datasets chromium clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian packages the demo and the tests read (DESIGN.md, "Reference data and models").
datasets:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Headless Chromium: tests/test_report.py renders the HTML report and checks the screenshot.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	fi

$(DEMO_DIR)/catalog.parquet: | $(STAMP) datasets
	$(BIN)/lookalike demo-data --out $(DEMO_DIR) --limit $(DEMO_LIMIT)

demo: $(STAMP) datasets $(DEMO_DIR)/catalog.parquet
	$(BIN)/lookalike nightly --conf $(CONF)

test: $(STAMP) datasets chromium
	$(BIN)/python -m pytest -q --durations=20 tests

# Lint and format check, then the type check; settings in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check lib tests benchmarks jobs examples
	$(BIN)/ruff format --check lib tests benchmarks jobs examples
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/python -m lookalike.config > docs/configuration.md

clean:
	rm -rf $(DEMO_DIR) out
