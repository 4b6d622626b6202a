# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# Every package of the environment at an exact version (torch included); `make lock` refreshes it.
# pyproject.toml keeps compatible ranges for people who pip install the package.
LOCK := requirements.lock
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
# The PyTorch releases this project is built and tested with (the lock is resolved under them).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint data browser lock bench bench-quick bench-fmnist bench-sst2 gpu-inputs gpu-rehearsal clean

# The lock, then sidenet itself without dependencies (its build backend, setuptools, is in the lock).
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Resolve pyproject.toml's ranges (extras dev, text and serve, build dependencies too) to exact versions.
lock:
	rm -rf .lock-tools
	$(PYTHON) -m venv .lock-tools
	.lock-tools/bin/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	printf '%s\n' $(TORCH_PINS) > .lock-tools/torch-pins.txt
	.lock-tools/bin/pip-compile --quiet --extra dev --extra text --extra serve --strip-extras --all-build-deps --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --no-header -c .lock-tools/torch-pins.txt -o $(LOCK) pyproject.toml
	sed -i -e 's|-c .lock-tools/torch-pins.txt|TORCH_PINS of the Makefile|' \
		-e '1i # Every package of the environment at an exact version: written by `make lock` (pip-compile), installed by `make`.' $(LOCK)
	rm -rf .lock-tools

# Debian's dataset-fashion-mnist, when running as root on Debian; otherwise sidenet finds the data
# elsewhere (--data DIR, torchvision's download) or explains how to get it.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "note: could not install dataset-fashion-mnist with apt-get"; \
	fi

# Headless Chromium, for the test that renders `sidenet report`'s page (skipped where it is missing).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "note: could not install chromium with apt-get; the page-rendering test will be skipped"; \
	fi

demo: $(STAMP) data
	$(BIN)/sidenet demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: $(STAMP) data browser lint
	$(BIN)/python -m pytest -q

# Every benchmark (python -m benchmarks run), then BENCHMARKS.md regenerated from the JSON results;
# `make bench-quick` is the few-minute smoke version (results in benchmarks/results/quick/).
bench: $(STAMP) data
	$(BIN)/python -m benchmarks run

bench-quick: $(STAMP) data
	$(BIN)/python -m benchmarks run --quick

# One workload at a time.
bench-fmnist: $(STAMP) data
	$(BIN)/python -m benchmarks.fmnist_resnet

bench-sst2: $(STAMP)
	$(BIN)/python -m benchmarks.sst2_minilm

clean:
	rm -rf $(VENV) $(GPU_IMAGE_VENV) .lock-tools build dist src/*.egg-info .pytest_cache .ruff_cache

# What benchmarks/gpu_check.sh needs on the GPU machine, gathered into .gpu-inputs/ (carried there, never
# committed): SST-2 dev (from SIDENET_SST2_DIR or ../shared/data/sst2), the MiniLM tokenizer, the
# pure-Python wheels of pytest at the lock's versions, and the two it needs before Python 3.11 (the device
# image has no project environment); and, where this machine has them, the fine-tuned MiniLM MainNet (cast to
# bfloat16 to fit) and its SideNet of the SST-2 benchmarks (benchmarks/gpu_inputs.py).
SST2_DIR ?= $(or $(SIDENET_SST2_DIR),../shared/data/sst2)
gpu-inputs: $(STAMP)
	rm -rf .gpu-inputs && mkdir -p .gpu-inputs/sst2 .gpu-inputs/tokenizer .gpu-inputs/wheels
	cp $(SST2_DIR)/dev.tsv .gpu-inputs/sst2/
	$(BIN)/python -c "from sidenet.text_pretrain import MINILM, load_tokenizer; load_tokenizer(MINILM).save_pretrained('.gpu-inputs/tokenizer')"
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .gpu-inputs/wheels \
		$$(grep -E '^(pytest|pluggy|iniconfig|packaging|pygments)==' $(LOCK))
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --platform any --python-version 3.10 \
		--implementation py --abi none -d .gpu-inputs/wheels exceptiongroup tomli
	$(BIN)/python -m benchmarks.gpu_inputs --out .gpu-inputs
	du -sh .gpu-inputs

# benchmarks/gpu_check.sh rehearsed on this CPU before device time is spent on it: a venv of the device
# image's PyTorch, torchvision and transformers releases and the packages the tests need that the image
# also has (its versions: the device tool's KINDS.md), none of this project's lock; pytest comes from
# .gpu-inputs' wheels, as on the device. The image's Python is 3.12; this one is whatever python3 is here.
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PINS := torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 numpy scipy hypothesis
gpu-rehearsal: gpu-inputs
	test -x $(GPU_IMAGE_VENV)/bin/python || $(PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install --quiet $(GPU_IMAGE_PINS)
	PATH="$(CURDIR)/$(GPU_IMAGE_VENV)/bin:$$PATH" OUT=/tmp/gpu-rehearsal bash benchmarks/gpu_check.sh --rehearse
