# lbctl: `make demo` shows it working, `make test` proves it.
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: deps demo test lint unit clean bench bench-control-plane

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

bench: bench-control-plane

# Figures for the README; see the docstring of bench/control_plane.py.
bench-control-plane: deps
	$(PY) bench/control_plane.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
