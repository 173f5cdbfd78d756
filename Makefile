# puzzlecam: `make test` and `make demo` are the quick start; each creates .venv and installs on first use.
PYTHON        ?= python3
TORCH_VERSION ?= 2.13.0
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
# Reinstall only when the build inputs change (a second `make test` installs nothing).
STAMP         := $(VENV)/.puzzlecam-installed
BUILD_INPUTS  := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
# Triton runs on the CPU only through its interpreter; it must be set before triton is imported.
GPU_VISIBLE    = $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
TEST_ENV       = $(if $(filter 1,$(GPU_VISIBLE)),,TRITON_INTERPRET=1)
PYTEST_ARGS   ?=
# Test processes (pytest-xdist), one test file each at a time (module fixtures run once): 2 use both cores of
# a 2-core machine while one test waits on its launched processes or runs single-threaded Python.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
DEMO_DIR      ?= demo_out

.PHONY: install lint format test test-fast demo bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install --no-build-isolation -e '.[test]'
	touch $@

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# CI runs everything, the lint first; test-fast leaves out the tests marked slow (launches, the demo).
test: install lint
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

demo: install
	$(TEST_ENV) $(PY) -m puzzlecam.demo --out $(DEMO_DIR)

bench: install
	$(TEST_ENV) $(PY) -m puzzlecam.bench kernels

clean:
	rm -rf build *.egg-info puzzlecam/_C*.so
