# pg-partition: developer and demo entry points. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ROWS ?= 1000000
FAULT_SEED ?= 1
FAULT_TRIALS ?= 3
# make soak: a conversion of SOAK_ROWS rows under SOAK_RATE tx/s of mixed writes for SOAK_SECONDS (bench/soak.py)
SOAK_ROWS ?= 2000000
SOAK_RATE ?= 500
SOAK_SECONDS ?= 300
# Tests wait on servers (locks, replication, Airflow) more than on CPU: 3 workers, one service stack each.
TEST_WORKERS ?= 3

.PHONY: venv demo demo-clean test test-matrix lint typecheck bench bench-large faults soak soak-max-rate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PY) -m pip install --quiet uv || { \
	  echo "ERROR: could not install uv with pip. Check the network to the Python package index (PyPI) or install uv yourself."; exit 1; }
	@[ -x $(VPY) ] || uv venv --quiet --python $(PY) $(VENV)
	@uv pip install --quiet --compile-bytecode --python $(VPY) -e '.[dev]' || { \
	  echo "ERROR: installing the dependencies failed. Check the network to the Python package index (PyPI)."; exit 1; }
	@touch $(STAMP)

demo: venv
	$(VPY) -m tools.demo run

demo-clean:
	@[ -x $(VPY) ] && $(VPY) -m tools.demo clean || rm -rf .demo

test: venv
	$(VPY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# The end-to-end scenarios (tests/matrix) on every PostgreSQL major as the non-superuser owner; writes the support
# table (docs/support-matrix.md and README). Server builds other than Debian's are fetched with npm into .cache/pg.
MATRIX_MAJORS ?= 13,14,15,16,17,18
MATRIX_JOBS ?= 2
test-matrix: venv
	$(VPY) -m tools.matrix run --majors $(MATRIX_MAJORS) --jobs $(MATRIX_JOBS) $(if $(MATRIX_RESULTS),--results $(MATRIX_RESULTS))

lint: venv
	$(VENV)/bin/ruff check provider tests dags bench tools
	$(VENV)/bin/mypy

bench: venv
	BENCH_ROWS=$(BENCH_ROWS) $(VPY) -m bench.run

# pgslice beside us at >= 10M rows (about an hour on 2 cores); the other suites at their usual size are skipped.
bench-large: venv
	BENCH_ROWS=$(BENCH_ROWS) BENCH_ONLY=pgslice BENCH_PEER_SIZES=$${BENCH_PEER_SIZES:-10000000} $(VPY) -m bench.run

soak: venv
	SOAK_ROWS=$(SOAK_ROWS) SOAK_RATE=$(SOAK_RATE) SOAK_SECONDS=$(SOAK_SECONDS) $(VPY) -m bench.soak

soak-max-rate: venv
	SOAK_ROWS=$(SOAK_ROWS) $(VPY) -m bench.soak --max-rate

faults: venv
	FAULT_SEED=$(FAULT_SEED) FAULT_TRIALS=$(FAULT_TRIALS) $(VPY) -m pytest tests/faults -m faults -q

clean: demo-clean
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
