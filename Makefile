# Esper developer entry points. `make build` sets up everything; `make test` and `make demo` use it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.stamps
# Debian packages the test suite needs (real servers started by the tests).
APT_PACKAGES ?= postgresql redis-server
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
EXT_SO := esper/_C.cpython-311-x86_64-linux-gnu.so
# A tiny compiled kernel a trainer loads once before training (esper.tezzeret.compiler.warm_up_loader).
WARMUP_PT2 := esper/tezzeret/warmup.pt2
TORCH_PIN := torch==2.13.0
BUF_VERSION := 1.75.0
PYTEST_ARGS ?=
NODE_CLIENT := clients/node
NODE_CLIENT_STAMP := $(NODE_CLIENT)/node_modules/.esper-npm-ci

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MAX_JOBS ?= 2

.PHONY: help build test test-all test-slow demo proto lint bench check-cuda clean distclean toolchain system-deps

help:
	@echo "make build       create .venv, install dependencies and system packages, build the extension"
	@echo "make test        run the default test suite (excludes tests marked slow)"
	@echo "make test-all    run every test, slow ones included"
	@echo "make test-slow   run only the slow tests (full-system runs; CI runs them after make test)"
	@echo "make demo        run the main job on the bundled default config"
	@echo "make proto       regenerate esper/v1 from proto/esper/v1/*.proto"
	@echo "make lint        ruff + buf lint"
	@echo "make bench       kernel benchmark (quick)"
	@echo "make check-cuda  compile the CUDA sources to objects with nvcc (no GPU needed)"
	@echo "make clean       remove build outputs (keeps .venv); distclean also removes .venv"

build: toolchain $(STAMPS)/deps system-deps $(STAMPS)/editable $(EXT_SO) $(WARMUP_PT2) $(NODE_CLIENT_STAMP)

toolchain:
	@ver=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null); \
	if [ -z "$$ver" ]; then echo "error: cannot run '$(PYTHON)'; Esper needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; fi; \
	case "$$ver" in 3.11.*) ;; *) echo "error: Esper needs Python 3.11 (torch 2.13.0 is installed from a cp311 wheel), but '$(PYTHON)' is Python $$ver; set PYTHON=/path/to/python3.11" >&2; exit 1;; esac
	@command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || { \
	  echo "error: no C++ compiler (c++/g++) found; the Kasmina extension needs one: apt-get install g++" >&2; exit 1; }

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS) && touch $@

# torch first, from its exact pin, so nothing later can pull a CUDA build.
$(STAMPS)/deps: $(STAMPS)/venv pyproject.toml requirements.lock
	$(PIP) install --quiet $(TORCH_PIN)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; o = p['optional-dependencies']; print('\n'.join(p['dependencies'] + o['dev'] + o['tracking']))" > $(STAMPS)/requirements.txt
	$(PIP) install --quiet -c requirements.lock -r $(STAMPS)/requirements.txt
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" || { echo "error: torch was replaced by another build" >&2; exit 1; }
	@touch $@

# Checked on every build (a dpkg query per package), so adding a package to APT_PACKAGES takes effect.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Console scripts (esper-train, esper-bench, ...) via an editable install; the extension is built below.
$(STAMPS)/editable: $(STAMPS)/deps pyproject.toml
	ESPER_SKIP_EXTENSION=1 $(PIP) install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# Node.js client (clients/node): exact versions from package-lock.json. The stamp lives inside
# node_modules so deleting node_modules reinstalls. Without npm the client is skipped (its test too).
$(NODE_CLIENT_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --silent && touch $(CURDIR)/$@; \
	else echo "warning: npm not found; skipping the Node.js client in $(NODE_CLIENT) (needs Node.js >= 18)" >&2; fi

$(EXT_SO): $(STAMPS)/deps setup.py $(CSRC)
	@mkdir -p build
	@echo "building the Kasmina extension esper._C (log: build/extension-build.log)"
	@$(PY) setup.py build_ext --inplace > build/extension-build.log 2>&1 || { tail -n 60 build/extension-build.log; echo "error: extension build failed; full log in build/extension-build.log" >&2; exit 1; }
	@touch $@

$(WARMUP_PT2): $(STAMPS)/deps $(EXT_SO) esper/tezzeret/compiler.py
	@$(PY) -c "from esper.tezzeret.compiler import write_warmup_artifact; write_warmup_artifact()"

test: build
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: build
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the tests marked slow (the full-system runs in tests/system): CI runs them after `make test`.
test-slow: build
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The main job on the bundled default config (digits, no download), on the full system: esper-train
# starts Urza, Tezzeret, Oona and Tamiyo, Tamiyo decides, Tezzeret compiles the seed's kernel, the
# kernel-ready event on Oona brings it into the run, and a seed goes DORMANT -> ... -> FOSSILIZED.
# Seeds wait for their kernel in wall-clock seconds (services.germination_timeout_s), not epochs.
demo: build
	rm -rf runs/demo
	$(VENV)/bin/esper-train --config configs/development.yaml --output-dir runs/demo --verbose --progress plain \
	  services.mode=local
	$(VENV)/bin/esper-export runs/demo

proto: $(STAMPS)/deps
	$(PY) proto/generate.py

$(VENV)/tools/node_modules/.bin/buf:
	npm install --silent --no-audit --no-fund --prefix $(VENV)/tools @bufbuild/buf@$(BUF_VERSION)

lint: $(STAMPS)/deps $(VENV)/tools/node_modules/.bin/buf
	$(PY) -m ruff check .
	cd proto && $(CURDIR)/$(VENV)/tools/node_modules/.bin/buf lint

bench: build
	$(VENV)/bin/esper-bench kernels --quick

# Compiles every .cu file to an object with nvcc against torch's headers: proves the CUDA code
# builds on a machine without a GPU (a CPU-only torch cannot link it).
check-cuda: $(STAMPS)/deps
	@command -v nvcc >/dev/null 2>&1 || { echo "error: nvcc not found; install the CUDA toolkit or set PATH" >&2; exit 1; }
	@mkdir -p build/check-cuda/shim/c10/cuda/impl
	@# The CPU wheel omits this CMake-generated header; its only content is the shared-lib flag.
	@echo '#define C10_CUDA_BUILD_SHARED_LIBS' > build/check-cuda/shim/c10/cuda/impl/cuda_cmake_macros.h
	@inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))"); \
	pyinc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -c $$f -o build/check-cuda/$$(basename $$f .cu).o -std=c++20 -O3 --expt-relaxed-constexpr \
	    -Xcompiler -fPIC -DESPER_WITH_CUDA -Icsrc/include -Ibuild/check-cuda/shim $$inc -I$$pyinc -D_GLIBCXX_USE_CXX11_ABI=1 || exit 1; \
	done; echo "all CUDA sources compiled"

clean:
	rm -rf build esper/_C*.so $(WARMUP_PT2) esper/*.egg-info *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
