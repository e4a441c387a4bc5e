# cnnlab: `make demo` trains, evaluates and reports on a dataset that needs no network;
# `make test` runs the test suite. Both create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := tune,explain,dev
FASHION_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install system-deps fashion-mnist bench bench-keras bench-speed bench-speed-94 bench-levers clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Debian packages: the real Fashion-MNIST, Chromium for browser tests, PostgreSQL for the
# multi-host tuning test. Installed when apt-get is usable; tests that need one skip without it.
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && ( [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null ); then \
	  missing=""; \
	  [ -d $(FASHION_DIR) ] || missing="$$missing dataset-fashion-mnist"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "apt-get not usable: skipping Debian packages (Fashion-MNIST, chromium, postgresql)"; fi

fashion-mnist:
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null 2>&1 && ( [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null ); then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

# Fashion-MNIST from Debian's package when it is there, else scikit-learn's embedded digits.
demo: $(STAMP) fashion-mnist
	@if [ -d $(FASHION_DIR) ]; then \
	  $(BIN)/cnnlab train --dataset fashion-mnist --name demo; \
	else \
	  echo "Fashion-MNIST is not installed; running the demo on the embedded digits set."; \
	  $(BIN)/cnnlab train --dataset digits --name demo --epochs 30; \
	fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Benchmarks (not part of `make test`); see README "Performance".
KERAS_VENV := .venv-keras
KERAS_STAMP := $(KERAS_VENV)/.installed-stamp

$(KERAS_STAMP): benchmarks/requirements-keras.txt
	$(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/pip install --quiet --disable-pip-version-check -r benchmarks/requirements-keras.txt
	touch $(KERAS_STAMP)

# cnnlab against Keras 3 / TensorFlow on tiny, basic and dropout, alternating, in one run.
bench-keras: $(STAMP) $(KERAS_STAMP) fashion-mnist
	$(BIN)/python benchmarks/bench_keras.py --keras-python $(KERAS_VENV)/bin/python --epochs 5 --seeds 0 1 2

# The default recipe to 93% on Fashion-MNIST: 3 seeds, training and whole-command wall time.
bench-speed: $(STAMP) fashion-mnist
	$(BIN)/python benchmarks/bench_time_to_accuracy.py --seeds 0 1 2

# The wide preset to 94% within 5 minutes: 15 epochs on all 60,000 training images, flips.
bench-speed-94: $(STAMP) fashion-mnist
	$(BIN)/python benchmarks/bench_time_to_accuracy.py --seeds 0 1 2 --model wide --epochs 15 \
		--target 0.94 --budget 300 \
		--set data.val_split=0 data.augment.flip=true train.tta_flip=true

# Matmul ceiling, training GFLOP/s and eval images/s of every preset.
bench: $(STAMP)
	$(BIN)/cnnlab bench

# Each kept speed lever on and off, interleaved in one process.
bench-levers: $(STAMP)
	$(BIN)/python benchmarks/bench_levers.py

clean:
	rm -rf $(VENV) $(KERAS_VENV) runs .pytest_cache
