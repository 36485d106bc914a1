# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
# The offline GLUE-style files live beside the checkout when they exist (CI too).
ifneq ($(wildcard $(SHARED_DATA)/MANIFEST.txt),)
export DPFLAT_DATA_DIR ?= $(SHARED_DATA)
endif
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all lab clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: the local CPU build; a looser request pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m dpflat demo --output-dir out/demo

# One worker per core (pytest-xdist): every test runs one torch thread (tests/conftest.py), so
# on 2 cores two workers halve the suite. A file's tests stay on one worker (their module
# fixtures are built once). `python -m pytest tests/x.py` still runs in one process. -rs names
# each skipped test and why (a skip in CI should be explainable from its log).
XDIST := -n auto --dist loadfile

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rs $(XDIST)

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rs $(XDIST) -m "slow or not slow"

lab: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[lab]"
	# as root (containers, cloud notebooks) Jupyter refuses to start without --allow-root
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) out .pytest_cache
