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

.PHONY: setup demo demo-flux test ui lint format bench lock upgrade-check clean

setup: $(STAMP)

# The venv is exactly requirements/dev.lock (every package pinned with its hashes, see `make lock`); castlora itself
# is then installed editable on top, with the locked setuptools rather than an isolated build env's newest one.
# Reinstall when the lock or the project's metadata changes.
$(STAMP): requirements/pip.lock requirements/dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/pip.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the checked-in locks from pyproject.toml's ranges, keeping every locked version the ranges still admit.
# Add UPGRADE=1 to move every package to its newest release instead (then run `make test` before committing).
lock: $(STAMP)
	scripts/lock.sh $(BIN)/uv requirements $(if $(UPGRADE),--upgrade)

# Resolve the newest releases pyproject.toml admits into a scratch venv, run the fast tests against them and report
# which packages moved and what broke. Changes nothing in the repository or .venv; see README "Upgrading dependencies".
upgrade-check: $(STAMP)
	scripts/install-test-services.sh
	scripts/upgrade-check.sh $(BIN)/uv

demo: $(STAMP)
	$(BIN)/castlora demo

# The same pair pipeline on the FLUX.1 family (tiny random FLUX.1, CPU), docs/design.md#flux1.
demo-flux: $(STAMP)
	$(BIN)/castlora demo --preset tiny-flux

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
