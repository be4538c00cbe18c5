# lbctl: `make demo` shows it working, `make test` proves it.
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: deps demo test lint unit clean bench bench-control-plane bench-dataplane bench-program bench-upgrade

deps:
	@bash scripts/install-deps.sh

demo: deps
	@bash scripts/demo.sh

lint: deps
	$(BIN)/ruff check lbctl tests bench
	$(BIN)/ruff format --check lbctl tests bench
	$(BIN)/mypy --strict lbctl

test: lint
	$(PY) -m pytest -q tests

bench: bench-control-plane bench-dataplane bench-program bench-upgrade

# Figures for the README; see the docstring of bench/control_plane.py.
bench-control-plane: deps
	$(PY) bench/control_plane.py

# Per-packet cost against no load balancer and kube-proxy's iptables and nftables
# layouts; writes bench/results/dataplane.{json,png}. See bench/dataplane.py.
bench-dataplane: deps
	$(PY) bench/dataplane.py

# The BPF programs' own per-packet cost with BPF_PROG_TEST_RUN, per path and
# number of services; writes bench/results/program.{json,txt}. See bench/program.py.
bench-program: deps
	$(PY) bench/program.py

# Upgrades in place: map copy cost by size, flows kept across real agent upgrades;
# writes bench/results/upgrade.{json,txt}. See bench/upgrade.py.
bench-upgrade: deps
	$(PY) bench/upgrade.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
