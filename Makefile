# One-command entry points (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# DeepSpeed JIT-compiles a CPU communication op on first use (~30-60 s); keep it with this
# checkout's venv so other checkouts or venvs on the machine never invalidate it.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: venv test test-unit test-fast test-faults lint quickstart gpu-check clean

$(VENV)/.installed: setup.cfg setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU wheel of torch first: later resolutions then reuse it instead of pulling a CUDA build.
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e '.[test,plot,tensorboard]'
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# One process, no launcher: the quickest check while editing (also part of `test`).
test-unit: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

# The fault-injection suite alone (also part of `test`).
test-faults: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/faults

test-fast: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

quickstart: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_compact.json

gpu-check: venv
	$(PY) tools/gpu_check.py

lint: venv
	$(VENV)/bin/ruff check actcomp_dist launch tools tests

clean:
	rm -rf $(VENV) build *.egg-info
