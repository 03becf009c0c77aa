# leukoflow — make test | make demo | make bench | make lint
# A fresh machine needs only Python 3.11 and make: every target creates .venv first;
# make test also installs the system packages some tests need where it may (sysdeps).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: venv sysdeps test demo bench lint clean

venv: $(STAMP)

# torch is pinned (2.13.0, the CPU wheel) and installed first, so that nothing pulls the
# multi-GB CUDA build; GPU users: see README "GPU install".
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# the Triton server the tests start (tests/test_infer_triton.py): unpacked from the PyPI
	@# wheel nvidia-pytriton into ~/.cache/leukoflow at install time, not while tests run
	$(BIN)/python -c "from leukoflow.inference.triton_server import fetch_bundled; fetch_bundled()" \
		|| echo "make: could not fetch the Triton server (nvidia-pytriton); its tests will try again"
	touch $(STAMP)

# System packages some tests need (Chromium, Prometheus, ...; Debian/Ubuntu, the list is in
# deploy/ci/install-system-deps.sh): installed when this user may (root or passwordless sudo).
# Otherwise make test goes on and reports each test that needs one as NOT RUN, with the
# command that enables it; under CI (CI=true, .ci/run) a missing package fails those tests.
sysdeps:
	@if [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then \
		bash deploy/ci/install-system-deps.sh || { \
			echo "make: could not install the system packages: the tests that need them are NOT RUN"; \
			case "$${CI:-}" in 1|true|yes) exit 1;; esac; }; \
	else \
		echo "make: no root or passwordless sudo: tests that need system packages are NOT RUN" \
		     "(enable them with: sudo deploy/ci/install-system-deps.sh)"; \
	fi

# -rs prints why each skipped test did not run (e.g. NOT RUN: needs chromium ...)
test: venv sysdeps
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider --timeout=900 tests

demo: venv
	$(BIN)/leukoflow run --source sim:0:0.3 --duration 30 --out runs/demo

bench: venv
	$(BIN)/leukoflow bench all

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
