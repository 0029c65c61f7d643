# One Makefile: the targets a newcomer needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test test-fast lint bench proto clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## The main job on the embedded default: embedded Redis, in-process worker, offline model.
run: $(STAMP)
	$(BIN)/python -m tasktree submit "Design a web application for a community library. This includes database schema, backend API design, and frontend component structure."

## The whole test suite, slow tests included.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Only the fast tests (no real-process fault tests).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy tasktree workers celeryconfig.py

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

## Regenerate the protobuf module from agent.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Itasktree/proto --python_out=tasktree/proto --pyi_out=tasktree/proto tasktree/proto/agent.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
