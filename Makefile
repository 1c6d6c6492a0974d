# The two commands: `make dev` (Dagster UI + daemon with demo media) and `make test`.
# Both run `make setup`, which installs what is missing: ffmpeg with apt, Python packages into .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ERGOT_HOME ?= $(CURDIR)/.ergot
DAGSTER_HOME ?= $(ERGOT_HOME)/dagster
HOST ?= 127.0.0.1
PORT ?= 3000
export ERGOT_HOME DAGSTER_HOME

.PHONY: setup system venv dev demo test lint bench clean

setup: system venv

system:
	@PYTHON=$(PYTHON) scripts/ensure-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Copied once: an instance configured by hand (PostgreSQL, say) is never overwritten. Delete the
# copy to take a newer template.
$(DAGSTER_HOME)/dagster.yaml:
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m ergot_dagster.demo

# Started from ERGOT_HOME so that Dagster does not mistake the repository's dagster.yaml (the
# template copied into DAGSTER_HOME) for the instance's own.
dev: demo
	cd $(ERGOT_HOME) && $(CURDIR)/$(BIN)/dagster dev --host $(HOST) --port $(PORT) \
		-w $(CURDIR)/workspace.yaml

test: setup
	@scripts/ensure-postgres.sh
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(ERGOT_HOME)
