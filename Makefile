# Two commands for a new user: `make test` and `make demo`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# GPTQModel (the PyTorch GPTQ tool) in a venv of its own, for the interop tests and benchmarks/vs_gptqmodel.py: it
# pins its own torch/transformers. --no-deps: GPTQModel declares torch>=2.14.1 but runs on the pinned 2.13.0 CPU build,
# and a plain install would pull the CUDA torch (about 6 GB). About 1.6 GB; 1m50s here with a warm pip cache.
INTEROP_VENV ?= .venv-gptqmodel
INTEROP_REQS := tests/interop/gptqmodel-cpu-requirements.txt
INTEROP_STAMP := $(INTEROP_VENV)/.installed

# The compatibility tier (`make test-compat`, part of `make test`): Python 3.12 with the newest jax, flax and orbax
# that pip resolves, in a venv of its own without torch (the fast tests do not need it, and a plain torch pulls a
# multi-GB CUDA build). COMPAT_PYTHON is found by tools/find-python unless given; its stamp names the interpreter, so
# naming another one rebuilds the venv. Delete the venv (or `make clean`) to pick up newer releases.
COMPAT_VERSION ?= 3.12
COMPAT_PYTHON ?= $(shell tools/find-python $(COMPAT_VERSION))
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(COMPAT_VERSION)

# The fast tier: unit tests of the solver, quantizer, packing, trace, plan and rules, without the slow ones.
FAST_TESTS := tests/test_quantizer.py tests/test_gptq.py tests/test_packing.py tests/test_engine.py \
	tests/test_layout.py tests/test_watchdog.py
PYTEST_FAST := -m pytest -q -n 2 -m "not slow" $(FAST_TESTS)

.PHONY: test test-main test-fast test-compat compat-venv demo install interop-venv lint bench clean cuda-venv \
	gpu-check hf-flax

# Hugging Face's Flax Llama (transformers 4.x; 5.x has no Flax models), for tests/test_engine_hf_flax.py: installed
# with --no-deps into a directory put first on the path of that test's child process only, beside the pinned
# tokenizers/huggingface_hub that transformers 4 checks for at import. About 60 MB.
HF_FLAX_DIR ?= .venv-hf-flax
HF_FLAX_STAMP := $(HF_FLAX_DIR)/.installed

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

$(INTEROP_STAMP): $(INTEROP_REQS)
	rm -rf $(INTEROP_VENV)
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q --no-deps -r $(INTEROP_REQS)
	touch $(INTEROP_STAMP)

interop-venv: $(INTEROP_STAMP)

$(HF_FLAX_STAMP): | $(PY)
	rm -rf $(HF_FLAX_DIR)
	$(PY) -m pip install -q --no-deps --target $(HF_FLAX_DIR) "transformers==4.57.*" "tokenizers>=0.22,<=0.23.0" \
		"huggingface_hub>=0.34,<1.0"
	touch $(HF_FLAX_STAMP)

hf-flax: $(HF_FLAX_STAMP)

# SM90_COMPILE_VENV makes the sm_90a compile check mandatory (it fails, not skips, if that venv is broken), and
# GPTQ_JAX_REQUIRE_INTEROP the GPTQModel interop tests. Under loadgroup, tests/conftest.py's scheduler keeps each
# file of its ONE_WORKER_FILES (the GPTQModel interop module, the mesh subprocesses) on one worker, so their module
# fixtures run once, and hands the slow tests out first.
test: test-main test-compat

test-main: $(STAMP) $(CUDA_STAMP) $(INTEROP_STAMP) $(HF_FLAX_STAMP)
	SM90_COMPILE_VENV=$(CUDA_VENV) GPTQ_JAX_REQUIRE_INTEROP=1 GPTQ_JAX_HF_FLAX=$(HF_FLAX_DIR) JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 \
		--dist loadgroup --durations=15 tests

test-fast: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) $(PYTEST_FAST)

$(COMPAT_STAMP): pyproject.toml
	@test -n "$(COMPAT_PYTHON)" || { echo "no Python $(COMPAT_VERSION) for the compatibility tier:" \
		"name one with make COMPAT_PYTHON=/path/to/python$(COMPAT_VERSION)"; exit 1; }
	rm -rf $(COMPAT_VENV)
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q --upgrade -e '.[test-core]'
	$(COMPAT_PY) -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|orbax-checkpoint|numpy) '
	touch $(COMPAT_STAMP)

compat-venv: $(COMPAT_STAMP)

# The fast tests, the three small examples (scanned layers read the scan equation, whose parameters changed in
# JAX 0.12), and the demo at quick settings: a whole-model GPTQ of SmolLM2 (2 windows
# of 64 tokens), packed, saved, loaded back and evaluated and sampled.
test-compat: $(COMPAT_STAMP)
	JAX_PLATFORMS=cpu $(COMPAT_PY) $(PYTEST_FAST)
	JAX_PLATFORMS=cpu $(COMPAT_PY) examples/own_nnx_model.py
	JAX_PLATFORMS=cpu $(COMPAT_PY) examples/linen_model.py
	JAX_PLATFORMS=cpu $(COMPAT_PY) examples/scanned_llama.py
	JAX_PLATFORMS=cpu $(COMPAT_PY) examples/demo.py --nsamples 2 --seqlen 64 --eval-windows 2 \
		--out $(COMPAT_VENV)/demo-out

# Fetches and converts SmolLM2-135M-Instruct, then float vs RTN vs GPTQ at 4-bit group 128 (see examples/demo.py).
demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP) $(INTEROP_STAMP)
	$(PY) benchmarks/bench_gptq.py
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/vs_gptqmodel.py

lint: $(STAMP)
	$(VENV)/bin/ruff check gptq_jax pallas_kernels tests benchmarks examples

# The prepared GPU run (benchmarks/gpu_check.py): on a machine with an H100/H200 and JAX with CUDA.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(CUDA_VENV) $(INTEROP_VENV) $(COMPAT_VENV) .pytest_cache
