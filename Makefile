# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint data browser bench bench-quick bench-fmnist bench-sst2 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

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
	$(BIN)/python benchmarks/fmnist_resnet.py

bench-sst2: $(STAMP)
	$(BIN)/python benchmarks/sst2_minilm.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
