# Quick start: `make run` (venv + install + data + demo), `make test` (test deps + suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=
# two pytest-xdist workers, whole test files each, the longest files first (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: run test test-fast data install lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel >/dev/null

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST: $DPSISA_DATA, else the Debian package (installed here when apt can), else explain.
data:
	@if [ -n "$$DPSISA_DATA" ] && [ -f "$$DPSISA_DATA/train-images-idx3-ubyte.gz" ]; then echo "data: using $$DPSISA_DATA"; \
	elif [ -f $(FMNIST) ]; then echo "data: Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) && echo "data: installed dataset-fashion-mnist"; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else echo "data: Fashion-MNIST missing: apt-get install dataset-fashion-mnist, or set DPSISA_DATA to a folder with the idx .gz files, or run with data.download=true (internet)" >&2; exit 1; fi

run: install data
	$(BIN)/dpsisa demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Unit tests only: pure, no Ray cluster, no training runs.
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests/unit $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check pipeline tests bench jobs

bench: install data
	$(BIN)/python bench/dp_throughput.py
	$(BIN)/python bench/forget_speedup.py

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
