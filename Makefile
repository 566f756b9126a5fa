# make test   set up .venv from nothing (torch, the package with its compiled kernels) and run the tests
# make demo   the same setup, then `hesslab demo`
# make bench  the same setup, then the CPU benchmarks
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
HESSLAB_CUDA ?= auto
PYTEST_ARGS ?=
export HESSLAB_CUDA
# nvcc on PATH may be a wrapper: point the build at the real toolkit when it is there.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: venv install test demo bench clean

venv:
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q "$(TORCH_SPEC)"; }
	@$(PY) -m pip install -q setuptools wheel ninja numpy

install: venv
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	$(PY) -m hesslab info

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/hesslab demo

bench: install
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers']))")
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/hesslab bench

clean:
	rm -rf build *.egg-info hesslab/_C*.so hesslab/_build_config.json
