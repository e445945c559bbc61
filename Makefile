# Two commands for a new user: `make test` and `make demo`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install lint bench clean cuda-venv gpu-check

# A second venv, only for compiling the Pallas kernels to sm_90a without a GPU (tests/test_sm90_compile.py):
# JAX's CUDA plugin registers the Triton compile handler, and the nvcc wheel brings ptxas. --no-deps keeps the
# CUDA runtime libraries (gigabytes, useless without a GPU) out. Pinned to the JAX whose Triton pipeline it tests.
JAX_CUDA_VERSION := 0.10.2
CUDA_VENV ?= .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.installed-$(JAX_CUDA_VERSION)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'
	$(PY) -m pip download -q --no-deps google-tunix==0.1.7 recurrentgemma==1.0.1 -d .cache/wheels
	touch $(STAMP)

install: $(STAMP)

$(CUDA_STAMP):
	rm -rf $(CUDA_VENV)
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q jax==$(JAX_CUDA_VERSION) jaxlib==$(JAX_CUDA_VERSION)
	$(CUDA_VENV)/bin/python -m pip install -q --no-deps jax-cuda12-plugin==$(JAX_CUDA_VERSION) \
		jax-cuda12-pjrt==$(JAX_CUDA_VERSION) nvidia-cuda-nvcc-cu12
	touch $(CUDA_STAMP)

cuda-venv: $(CUDA_STAMP)

# SM90_COMPILE_VENV makes the sm_90a compile check mandatory: it fails, not skips, if that venv is broken.
test: $(STAMP) $(CUDA_STAMP)
	SM90_COMPILE_VENV=$(CUDA_VENV) JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=15 tests

# Fetches and converts SmolLM2-135M-Instruct, then float vs RTN vs GPTQ at 4-bit group 128 (see examples/demo.py).
demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_gptq.py
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/bench_model.py

lint: $(STAMP)
	$(VENV)/bin/ruff check gptq_jax pallas_kernels tests benchmarks examples

# The prepared GPU run (benchmarks/gpu_check.py): on a machine with an H100/H200 and JAX with CUDA.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(CUDA_VENV) .pytest_cache
