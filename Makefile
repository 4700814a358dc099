# Refund gateway: `make run` starts the service on the SQLite default with demo
# data; `make test` runs every test. Both set up what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PROTOS := $(wildcard protos/refund/v1/*.proto)
GENERATED := $(patsubst protos/%.proto,gen/%_pb2.py,$(PROTOS))

# The buf CLI (lint and breaking-change checks of protos/), pinned, from the npm
# registry into the project's own .tools/ (not committed): needs node and npm.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF   := $(TOOLS)/node_modules/.bin/buf
# The protos of the last release, as a buf image: `buf breaking` compares against
# it (CI runs without git history, so not against a git ref). See protos/releases/.
PROTO_RELEASE := protos/releases/v0.1.0.binpb

.PHONY: help install tools proto migrate demo run test test-fast test-unit mutation bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv and install the project with its test tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

tools: $(TOOLS)/.buf-$(BUF_VERSION) ## install the pinned buf CLI (npm @bufbuild/buf) into .tools/

$(TOOLS)/.buf-$(BUF_VERSION):
	@command -v npm >/dev/null || { echo "make tools needs npm (Debian: apt-get install npm)"; exit 2; }
	rm -f $(TOOLS)/.buf-*
	npm install --prefix $(TOOLS) --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	$(BUF) --version
	touch $@

proto: $(GENERATED) ## generate the gRPC/protobuf code into gen/ (not committed)

gen/%_pb2.py: protos/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $<

migrate: proto ## create or upgrade the database schema (REFUND_DATABASE_URL, default sqlite:///refund.db)
	$(BIN)/refund-admin migrate

demo: migrate ## load the demo merchant, its key and orders
	$(BIN)/refund-admin demo

run: demo ## start refund-service and refund-edge on the SQLite default with demo data (Ctrl-C stops both)
	$(PY) -m gateway_edge.run_all

test: proto ## run all tests (PostgreSQL tests skip without PostgreSQL unless REFUND_REQUIRE_POSTGRES=1)
	$(BIN)/pytest

test-fast: proto ## run the tests but the slow storms
	$(BIN)/pytest -m 'not slow'

test-unit: proto ## run tests/unit alone: the rules and pure functions, seconds, no database, no process
	$(BIN)/pytest tests/unit

mutation: proto ## mutation testing of the rules: domain.py (mutmut) and the stores' SQL conditions; 7-22 min, needs PostgreSQL; not in CI
	$(PY) -m pip install --quiet -e '.[dev,mutation]'
	$(PY) -m mutation.run

SOAK ?= 20
BENCH_ARGS ?=

bench: proto ## load test on SQLite and PostgreSQL, floors, memory soak (SOAK=300 for 5 min), issue 16's ratios; needs wrk, PostgreSQL
	@command -v wrk >/dev/null || { echo "make bench needs wrk (Debian: apt-get install wrk)"; exit 2; }
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.run --soak $(SOAK) $(BENCH_ARGS)

lint: install tools ## ruff on the Python (pyproject's [tool.ruff]); buf lint (STANDARD + COMMENTS) and buf breaking against the last release
	$(BIN)/ruff check .
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_RELEASE)

clean: ## remove the virtual environment, generated code, .tools and local databases
	rm -rf $(VENV) gen/refund/v1/*_pb2*.py* *.egg-info build dist refund.db refund.db-wal refund.db-shm demo mutants $(TOOLS)
