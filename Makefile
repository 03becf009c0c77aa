# leukoflow — make test | make demo | make bench | make lint
# A fresh machine needs only Python 3.11 and make: every target creates .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

# torch is pinned (2.13.0, the CPU wheel) and installed first, so that nothing pulls the
# multi-GB CUDA build; GPU users: see README "GPU install".
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 tests

demo: venv
	$(BIN)/leukoflow run --source sim:0:0.3 --duration 30 --out runs/demo

bench: venv
	$(BIN)/leukoflow bench all

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
