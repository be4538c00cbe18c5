# lbctl: `make demo` shows it working, `make test` proves it.
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: deps demo image test lint unit clean bench bench-control-plane bench-dataplane bench-program \
	test-reliability bench-reliability bench-upgrade

deps:
	@bash scripts/install-deps.sh

demo: deps
	@bash scripts/demo.sh

# The agent's image from deploy/Dockerfile, with docker (a running engine),
# podman or buildah, on a Debian base made here; layers are cached. IMAGE=name:tag
# to tag it otherwise. See scripts/image.sh.
image: deps
	@bash scripts/image.sh

lint: deps
	$(BIN)/ruff check lbctl tests bench
	$(BIN)/ruff format --check lbctl tests bench
	$(BIN)/mypy --strict lbctl
	$(BIN)/lint-imports  # the import layers, [tool.importlinter] in pyproject.toml
	promtool check rules deploy/prometheus/lbctl-rules.yaml
	$(PY) scripts/prometheusrule.py --check

test: lint
	$(PY) -m pytest -q tests

# The pure tests (marked `unit`: the model, the parser, the plan, the config,
# the manifests and deploy/'s rules), without root, in seconds. Uses the .venv
# `make deps` made (deps itself installs Debian packages, as root).
unit:
	$(PY) -m pytest -q -m unit tests

# Issue 18's reliability suites, short (they are part of `make test` too):
# restarts, rolling updates and full tables under load; API faults, malformed
# objects and packet fuzzing; each printing its figures.
test-reliability: deps
	$(PY) -m pytest -q -m reliability tests

bench: bench-control-plane bench-dataplane bench-program bench-reliability bench-upgrade

# Figures for the README, and the cold sync of 10,000 real-shaped Services against
# the LIST-and-decode floor (issue 20); see the docstring of bench/control_plane.py.
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

# The reliability suites with longer load, more restarts and bigger floods, more
# faults, objects and frames; their figures go to bench/results/reliability.txt too.
bench-reliability: deps
	rm -f bench/results/reliability.txt
	LBCTL_RELIABILITY=full LBCTL_RELIABILITY_OUT=bench/results/reliability.txt \
		$(PY) -m pytest -q -m reliability tests

# Upgrades in place: map copy cost by size, flows kept across real agent upgrades;
# writes bench/results/upgrade.{json,txt}. See bench/upgrade.py.
bench-upgrade: deps
	$(PY) bench/upgrade.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache .import_linter_cache
