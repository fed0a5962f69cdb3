# make test   set up .venv (torch from local disk, epban editable with its extension) and run the tests
# make demo   set up, then the demo on embedded sample data (writes demo_out/)
# make bench  pytest-benchmark comparisons (CPU here; CUDA rows too on a GPU machine)
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.epban-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

# The nvcc on PATH may be a wrapper from which torch guesses a wrong CUDA home.
ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -m epban info
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out

bench: $(STAMP)
	$(PY) -m pytest benches --benchmark-only --benchmark-columns=min,median,max,rounds

clean:
	rm -rf build *.egg-info epban/_C*.so demo_out .pytest_cache .benchmarks
