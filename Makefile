# Kiln: every target installs what it needs first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
RUNTIME_SOURCES := $(wildcard runtime/kiln_runtime/*.py)
# The MXNET framework's isolated environment (mxnet 1.9.1 has no Python 3.11 wheel); see requirements/mxnet.txt.
MXNET_PYTHON ?= python3.9
MXNET_VENV := .venv-mxnet
# The SageMaker Python SDK v2 + sagemaker-core for the SDK flow test (they cannot share .venv's packaging/protobuf).
SAGEMAKER_VENV := .venv-sagemaker
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export TVM_NUM_THREADS ?= 2
PYTEST_ARGS ?=

.PHONY: install debian-packages demo test test-fast lint synth bench fuzz load serve-load clean wheels gpu-check-bundle \
        check-wheels

install: $(STAMP)

# Debian packages: cross toolchains (aarch64, armv7, mingw) and qemu-user to run foreign artifacts (debian.txt,
# also in the compiler image); Chromium for the console's browser tests (debian-dev.txt, tests only).
debian-packages:
	@missing=$$(for p in $$(grep -hv '^#' requirements/debian.txt requirements/debian-dev.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml requirements/base.txt requirements/runtime.txt requirements/runtime-cuda.txt requirements/compiler.txt requirements/dev.txt \
          requirements/debian.txt requirements/debian-dev.txt requirements/mxnet.txt requirements/serving.txt requirements/sagemaker-sdk.txt runtime/pyproject.toml \
          scripts/kiln_assets.py $(RUNTIME_SOURCES)
	@$(MAKE) --no-print-directory debian-packages
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps -e runtime
	@# The same assets the compiler image gets (compiler-container/Dockerfile runs the same script).
	$(PY) scripts/kiln_assets.py windows-ffi
	$(PY) scripts/kiln_assets.py emulation-root aarch64
	@[ -x $(MXNET_VENV)/bin/python ] || { \
	  py=$$(for c in $(MXNET_PYTHON) $$HOME/.pyenv/versions/3.9*/bin/python3.9; do \
	    $$c -c 'import sys; assert sys.version_info[:2] == (3, 9)' 2>/dev/null && echo $$c && break; done); \
	  [ -n "$$py" ] || { echo "Python 3.9 is required for the MXNET framework ($(MXNET_PYTHON) not found)"; exit 1; }; \
	  $$py -m venv $(MXNET_VENV); }
	$(MXNET_VENV)/bin/python -m pip install -q -r requirements/mxnet.txt
	@[ -x $(SAGEMAKER_VENV)/bin/python ] || $(PYTHON) -m venv $(SAGEMAKER_VENV)
	$(SAGEMAKER_VENV)/bin/python -m pip install -q -r requirements/sagemaker-sdk.txt
	@touch $@

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -p no:cacheprovider -n 2 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -p no:cacheprovider -n 2 -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check functions compiler-container serving-container infra runtime tests scripts bench
	$(VENV)/bin/mypy functions/kiln compiler-container/kiln_compiler infra/kiln_infra runtime/kiln_runtime serving-container/kiln_serving

synth: install
	$(PY) infra/app.py

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# kiln-runtime platform wheels (linux x86_64, linux aarch64, win_amd64) into dist/.
wheels: install
	$(PY) scripts/kiln_assets.py wheels --dist dist

# Every pin of the compiler image resolves from wheels for linux/aarch64 and x86_64 (needs PyPI; ADR 0030).
check-wheels: install
	$(PY) scripts/check_wheels.py --machine aarch64 --machine x86_64

# A self-contained folder for a machine with an NVIDIA GPU and no network (see scripts/gpu-check).
gpu-check-bundle: install
	$(PY) scripts/gpu_check_bundle.py --out build/gpu-check

# API fuzzing from botocore's shapes: FUZZ_EXAMPLES per generated test (4 tests: >= 10,000 requests in all).
FUZZ_EXAMPLES ?= 4000
fuzz: install
	@mkdir -p bench/results
	KILN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KILN_FUZZ_REPORT=bench/results/fuzz-latest.json \
	  $(PY) -m pytest -p no:cacheprovider -q tests/functional/test_api_fuzz.py
	@cat bench/results/fuzz-latest.json

# Load against `kiln serve` on 127.0.0.1 (a benchmark, not a test; < 10 min).
load: install
	$(PY) bench/load.py $(LOAD_ARGS)

# kiln serve-model under 1, 8 and 32 concurrent clients (bench/serve_load.py; writes bench/results/).
serve-load: install
	$(PY) bench/serve_load.py $(SERVE_LOAD_ARGS)

clean:
	rm -rf cdk.out build .mypy_cache .ruff_cache .pytest_cache
