# The README's two commands: `make demo` and `make test`. Each bootstraps what is missing.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test bootstrap services-up services-down lint format typecheck check bench clean

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

bench: bootstrap
	$(BIN)/python -m bench

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
