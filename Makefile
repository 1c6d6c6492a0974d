# The two commands: `make dev` (Dagster UI + daemon with demo media) and `make test`.
# Both run `make setup`, which installs what is missing: ffmpeg with apt, Python packages into .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ERGOT_HOME ?= $(CURDIR)/.ergot
DAGSTER_HOME ?= $(ERGOT_HOME)/dagster
HOST ?= 127.0.0.1
PORT ?= 3000
COMFYUI_PORT ?= 8188
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

# Dagster's webserver and daemon, plus a ComfyUI for the comfyui-local target: the one running
# at 127.0.0.1:$(COMFYUI_PORT) if any, else the protocol stand-in (scripts/dev.sh says more).
dev: demo
	@BIN=$(BIN) HOST=$(HOST) PORT=$(PORT) COMFYUI_PORT=$(COMFYUI_PORT) scripts/dev.sh

test: setup
	@scripts/ensure-postgres.sh
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Benchmarks, run by hand: each prints its figures and rewrites its section of
# docs/performance.md. `make bench BENCH_ARGS="batch --quick"` runs some, small; sizes also come
# from ERGOT_BENCH_* variables (python -m bench --help).
bench: setup
	@scripts/ensure-postgres.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(ERGOT_HOME)
