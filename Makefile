# castlora: `make demo` sets up and runs the whole pipeline on the sample pair; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export CASTLORA_HOME ?= $(CURDIR)/castlora_data
export DAGSTER_HOME ?= $(CASTLORA_HOME)/dagster_home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DAGSTER_DISABLE_TELEMETRY := 1

.PHONY: setup demo test ui lint format bench clean

setup: $(STAMP)

# Reinstall when the project's dependencies change; torch/torchvision are pinned in pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/castlora demo

# The suite starts real PostgreSQL, moto (S3) and Chromium on 127.0.0.1; the script apt-installs the first and last.
test: $(STAMP)
	scripts/install-test-services.sh
	$(BIN)/python -m pytest

ui: $(STAMP)
	$(BIN)/python -m assets.instance $(DAGSTER_HOME)
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_segmix

clean:
	rm -rf $(CASTLORA_HOME)
