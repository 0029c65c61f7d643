# One Makefile: the targets a newcomer needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test test-unit test-integration test-slow test-containers lint format bench chaos proto clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,otel]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,otel,bench]'
	touch $(BENCH_STAMP)

## The main job on the embedded default: embedded Redis, in-process worker, offline model.
## The offline model takes 0.3-0.9 s per call here, so the tree is seen growing.
run: $(STAMP)
	TASKTREE_OFFLINE_LATENCY=$${TASKTREE_OFFLINE_LATENCY:-0.3-0.9} $(BIN)/tasktree submit "Design a web application for a community library. This includes database schema, backend API design, and frontend component structure."

## The whole test suite: every tier.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## No Redis server, no processes: seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

## A real Redis, real workers, the real CLI.
test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

## Faults and long runs.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## The image and the compose stack on a real Docker engine (skipped without one).
test-containers: $(STAMP)
	$(BIN)/python -m pytest -q -m containers -rs

## Style and types: ruff (lint and format) and strict mypy, as CI runs them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

## Many trees under seeded kills, freezes and Redis restarts, at the shipped defaults.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos

## Regenerate the protobuf module from agent.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Itasktree/proto --python_out=tasktree/proto --pyi_out=tasktree/proto tasktree/proto/agent.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
