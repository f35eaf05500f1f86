# Quick start: `make demo` renders the example story offline; `make test` runs the whole suite.
# Both create or reuse a project-local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.storysync-installed
# A pinned torch first: on the development machines it is a local CPU wheel, while an unpinned
# torch would pull several GB of CUDA packages. A venv that already has torch keeps its own.
# open_clip ships the CLIP BPE vocabulary the offline presets tokenize with; it is installed with
# --no-deps because its torchvision requirement has no CPU build here and would pull a CUDA torch.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "open_clip_torch>=2.20"
	# rembg (storysync eval) imports pymatting, whose numba functions compile on the first import
	# (minutes on a small machine) and are cached after: pay that here, not in a test.
	$(PY) -c "import rembg"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/storysync render examples/story.yaml --model tiny-sdxl --out out/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -X faulthandler -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
