# make test   set up .venv from nothing (torch, the package with its compiled kernels) and run the tests
# make demo   the same setup, then `hesslab demo`
# make bench  the same setup, then the CPU benchmarks
#
# The setup is done once: stamp files in $(VENV) record it, and the package is rebuilt only
# when csrc/**, setup.py or pyproject.toml is newer than its stamp (or the compiled
# extension is gone, or HESSLAB_CUDA changed). `make clean` removes the build and the stamps.
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
HESSLAB_CUDA ?= auto
PYTEST_ARGS ?=
# Test models built from configs (transformers, timm, torchvision): installed with --no-deps so
# that pip cannot replace torch; torchvision matches TORCH_SPEC.
NODEPS_TEST ?= torchvision==0.29.1 timm==1.0.31
export HESSLAB_CUDA
# nvcc on PATH may be a wrapper: point the build at the real toolkit when it is there.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

VENV_STAMP    := $(VENV)/.hesslab-venv
INSTALL_STAMP := $(VENV)/.hesslab-install-cuda-$(HESSLAB_CUDA)
SOURCES       := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
# Rebuild when the compiled extension is missing even if the stamp is newer than the sources.
ifeq ($(wildcard hesslab/_C*.so),)
INSTALL_FORCE := FORCE
endif
# The browser test (marker `browser`) runs when Chromium is installed, and is skipped otherwise.
CHROMIUM    := $(firstword $(shell command -v chromium chromium-browser 2>/dev/null))

.PHONY: venv install test demo bench clean FORCE

venv: $(VENV_STAMP)

$(VENV_STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q "$(TORCH_SPEC)"; }
	@$(PY) -m pip install -q "setuptools>=77" wheel ninja numpy
	@touch $@

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): $(VENV_STAMP) $(SOURCES) $(INSTALL_FORCE)
	$(PY) -m pip install -q --no-deps $(NODEPS_TEST)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	$(PY) -m hesslab info
	@rm -f $(VENV)/.hesslab-install-cuda-*
	@touch $@

test: install
	@$(if $(CHROMIUM),echo "Chromium: $(CHROMIUM) (browser tests run)",echo "Chromium not found: browser tests are skipped")
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/hesslab demo

bench: install
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers']))")
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/hesslab bench

clean:
	rm -rf build *.egg-info hesslab/_C*.so hesslab/_build_config.json $(VENV)/.hesslab-venv $(VENV)/.hesslab-install-cuda-*
