# StorePulse developer entry points. Each target bootstraps what it needs first
# (scripts/bootstrap is idempotent and takes a second when everything is in place).
#
#   make demo    the demo chain on SQLite at http://$(HOST):$(PORT)/ (HOST/PORT overridable)
#   make test    ruff, mypy and pytest on TimescaleDB + SQLite + the real Mosquitto (what CI runs)
#   make lint    ruff and mypy only
#   make bench   every bench/*_bench.py on this machine (see bench/README.md)
#   make bootstrap [SERVICES=1]   just prepare .venv (and the services)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MYPY_TARGETS ?= .

.PHONY: help demo test lint bench bootstrap check-lint

help:
	@sed -n '1,8p' Makefile | sed 's/^# \{0,1\}//'

bootstrap:
	bash scripts/bootstrap $(if $(SERVICES),--services,)

demo:
	bash scripts/bootstrap
	$(BIN)/storepulse demo --host $(HOST) --port $(PORT)

lint:
	bash scripts/bootstrap
	@$(MAKE) --no-print-directory check-lint

test:
	bash scripts/bootstrap --services
	@$(MAKE) --no-print-directory check-lint
	$(BIN)/pytest -q

bench:
	bash scripts/bootstrap --services
	@for bench in bench/*_bench.py; do \
	    module="bench.$$(basename "$$bench" .py)"; \
	    echo "== $$module"; \
	    $(BIN)/python -m "$$module"; \
	done

check-lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_TARGETS)
