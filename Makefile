# The README's two commands: `make demo` and `make test`. Each bootstraps what is missing.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test bootstrap services-up services-down lint format typecheck check bench bench-quick bench-env clean

$(BIN)/worker: pyproject.toml scripts/bootstrap
	VENV=$(VENV) scripts/bootstrap
	@touch $@

bootstrap: $(BIN)/worker

demo: bootstrap
	$(BIN)/worker demo

test: bootstrap
	$(BIN)/worker services up
	$(BIN)/pytest $(PYTEST_ARGS)

services-up: bootstrap
	$(BIN)/worker services up

services-down: bootstrap
	$(BIN)/worker services down

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: bootstrap
	$(BIN)/mypy worker

check: lint typecheck test

# The side-by-side run against the model's own encode, LangChain, LlamaIndex and a naive
# pipeline (bench/results.md, bench/results.png); about 15 minutes on 2 cores.
bench: bench-env
	$(BIN)/python -m bench

bench-quick: bench-env
	$(BIN)/python -m bench --quick

# The bench extra in our venv, and the peers' own environment (.venv-peers).
bench-env: bootstrap
	VENV=$(VENV) scripts/bootstrap-bench

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
