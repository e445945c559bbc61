# Two commands for a new user: `make test` and `make demo`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'
	$(PY) -m pip download -q --no-deps google-tunix==0.1.7 -d .cache/wheels
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=15 tests

# Fetches and converts SmolLM2-135M-Instruct, then float vs RTN vs GPTQ at 4-bit group 128 (see examples/demo.py).
demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_gptq.py
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/bench_model.py

lint: $(STAMP)
	$(VENV)/bin/ruff check gptq_jax pallas_kernels tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache
