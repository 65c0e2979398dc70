# Every routine action, self-installing: a fresh clone needs only python3 and a C++ compiler.
#   make demo    set up (venv, torch, build) and run the main job
#   make test    set up and run the test suite
#   make bench   set up and run the CPU benchmarks
#   make docs    the API reference (docs/api) from the docstrings
#   make gpu-check   on a machine with a GPU: build, CUDA tests, sanitizer, GPU benchmarks
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h') setup.py

.PHONY: all setup build demo test bench docs gpu-check clean

all: build

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# NVIDIA's CUTLASS/CuTe headers for the CUDA convolution (headers only: no dependencies)
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	touch $@

setup: $(VENV)/.deps

# The editable install gives the package metadata and the `neptune` command; the
# extension itself is built in place with ninja (incremental between runs).
# Tool output goes to build/*.log (shown when a step fails); the console gets one line a step.
$(VENV)/.editable: $(VENV)/.deps pyproject.toml
	@mkdir -p build
	@echo "installing neptune_ext (editable) into $(VENV)   [log: build/editable.log]"
	@NEPTUNE_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e . \
		> build/editable.log 2>&1 || (cat build/editable.log; exit 1)
	@touch $@

neptune_ext/.built: $(VENV)/.editable $(SOURCES)
	@mkdir -p build
	@echo "building the C++/CUDA extension (a few minutes the first time)   [log: build/build.log]"
	@NEPTUNE_REQUIRE_EXT=1 MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace \
		> build/build.log 2>&1 || (tail -60 build/build.log; exit 1)
	@grep "^neptune_ext:" build/build.log || true
	@touch $@

build: neptune_ext/.built

demo: build
	$(PY) -m neptune_app.demo

test: build
	$(PY) -m pytest -q tests

# API reference from the docstrings (pdoc) into docs/api; `make test` checks that it builds.
# The library (neptune_ext), then the application built on it (neptune_app).
DOC_MODULES := neptune_ext neptune_ext.graph neptune_ext.attention.reference neptune_ext.stage.reference \
	neptune_app.models neptune_app.data neptune_app.train neptune_app.cli
docs: build
	$(PY) -m pdoc -o docs/api $(DOC_MODULES)
	@echo "API reference: docs/api/index.html"

bench: build
	$(PY) benchmarks/bench_graph_attention.py --what op,layer,gatv2
	$(PY) benchmarks/bench_stage.py
	$(PY) -m neptune_app.bench.stage_cpu --models resnet18,mobilenet_v2 --repeats 7

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build neptune_ext/_C*.so neptune_ext/.built *.egg-info
