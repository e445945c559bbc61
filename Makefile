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

.PHONY: test demo install interop-venv lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

$(INTEROP_STAMP): $(INTEROP_REQS)
	rm -rf $(INTEROP_VENV)
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q --no-deps -r $(INTEROP_REQS)
	touch $(INTEROP_STAMP)

interop-venv: $(INTEROP_STAMP)

# loadgroup keeps each xdist_group (the GPTQModel interop module) on one worker, so its fixture runs once.
test: $(STAMP) $(INTEROP_STAMP)
	GPTQ_JAX_REQUIRE_INTEROP=1 JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

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

clean:
	rm -rf $(VENV) $(INTEROP_VENV) .pytest_cache
