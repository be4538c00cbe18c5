# lbctl: `make demo` shows it working, `make test` proves it.
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: deps demo test lint unit clean

deps:
	@bash scripts/install-deps.sh

demo: deps
	@bash scripts/demo.sh

lint: deps
	$(BIN)/ruff check lbctl tests
	$(BIN)/ruff format --check lbctl tests
	$(BIN)/mypy --strict lbctl

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
