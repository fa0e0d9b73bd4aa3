# Two commands do all set-up on a fresh machine: `make demo` and `make test` (`make lint`
# too: ruff, mypy and the house rules; .ci/run is lint, test, then a wheel check).
# They create .venv when missing, install torch pinned to the CPU wheel on disk
# (torch==2.13.0) unless the venv already imports a torch, build kfac_fast._C, then run.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.kfac_fast_installed
# kfac-pytorch (for its adapter's tests) is not on the package index: CI has its wheel in
# ../shared/wheels beside the clone. Where that folder is absent its tests skip, saying why.
KFAC_PYTORCH_WHEEL ?= ../shared/wheels/kfac_pytorch-0.4.2-py3-none-any.whl
TORCH_PIN ?= torch==2.13.0
# Benchmarks and tests pin CPU threads so timings are comparable (2-core machines).
THREADS ?= 2
# MKL threads spin while waiting by default; on a shared 2-core machine that made one
# 785x785 eigh take 3-11 s instead of 0.2 s (measured by the demo helper).
export OMP_WAIT_POLICY ?= PASSIVE
# Linters pinned exactly: a new ruff or mypy release must not turn CI red on its own.
LINT_DEPS := ruff==0.17.6 mypy==2.4.1
DEPS := "setuptools>=77" wheel cmake ninja "pybind11>=2.12" numpy pytest pytest-benchmark \
        hypothesis matplotlib tqdm "triton==3.9.0" heavyball $(LINT_DEPS)

.PHONY: all install lint test test-fast test-interpret demo demo-lm bench compile-check clean
all: test

$(PYTHON):
	$(PY) -m venv $(VENV)

$(STAMP): $(PYTHON) pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*) $(wildcard $(KFAC_PYTORCH_WHEEL))
	$(PIP) install -q --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q $(DEPS)
	# ASDL's own requirements (torch, numpy) are already here; --no-deps keeps pip from
	# ever resolving another torch for it.
	$(PIP) install -q --no-deps asdfghjkl==0.1a5
	if [ -f "$(KFAC_PYTORCH_WHEEL)" ]; then $(PIP) install -q --no-deps "$(KFAC_PYTORCH_WHEEL)"; \
	else echo "no $(KFAC_PYTORCH_WHEEL): the kfac-pytorch adapter tests will skip"; fi
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -c "import kfac_fast, kfac_fast._C as C; print('kfac_fast._C:', C.build_info())"
	touch $(STAMP)

install: $(STAMP)

# ruff over the code, mypy over the typed public API (files and settings in pyproject.toml),
# and the house rules (module size, import direction, layer kinds, packaging).
lint: $(STAMP)
	$(VENV)/bin/ruff check kfac_fast kernels tests bench examples setup.py
	$(VENV)/bin/mypy
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m pytest -q tests/test_house.py

# Interpreted Triton tests need TRITON_INTERPRET=1 before kernels are decorated, so they
# run in their own pytest process.
test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m pytest -q tests --ignore=tests/triton
	OMP_NUM_THREADS=$(THREADS) TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/triton

test-fast: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m pytest -q -x tests --ignore=tests/triton -m "not slow"

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m kfac_fast.demo

# The transformer demo (issue 19): K-FAC against AdamW, SOAP and Muon; not part of `make test`.
demo-lm: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m kfac_fast.demo_lm

# Extra pytest arguments: make bench BENCH_ARGS="--benchmark-autosave" (or "-k eigh",
# "--benchmark-compare", ...).
BENCH_ARGS ?=
bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PYTHON) -m pytest -q bench --benchmark-columns=min,median,max $(BENCH_ARGS)

# The Triton kernels compiled (not run) under other Triton versions, to catch register
# spills; bench/compile_check.sh caches under build/compile_check (network needed once).
compile-check: $(STAMP)
	bash bench/compile_check.sh 3.6.0 3.8.0

clean:
	rm -rf build dist *.egg-info kfac_fast/_C*.so .mypy_cache .ruff_cache $(VENV)
