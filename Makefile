# make test / make bench work on a fresh machine: they create .venv (system site-packages visible,
# so an installed torch, e.g. a CUDA build, is reused), install torch only when it cannot be
# imported (TORCH_SPEC, overridable), install the test and example dependencies pinned to that
# torch (so none of them can replace it), install the package without build isolation, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.tvlars_fused_installed

.PHONY: install test test-all bench bench-full example clean

install: $(STAMP)

$(STAMP): Makefile setup.py pyproject.toml examples/requirements.txt $(wildcard csrc/* csrc/algo/*)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install "$(TRITON_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -c $(VENV)/torch-pin.txt "setuptools>=64" wheel ninja pybind11 pytest expecttest==0.3.0 safetensors \
		lightning==2.6.6 -r examples/requirements.txt
	$(PIP) install --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) -m bench

bench-full: $(STAMP)
	$(PY) -m bench --full

clean:
	rm -rf build *.egg-info tvlars_fused/_C*.so

example: $(STAMP)
	$(PY) examples/large_batch_digits.py
