# The two commands a user needs are `make demo` and `make test`; both run `setup` first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision are pinned to the builds this machine's pip serves from local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.sslray-installed
DEBIAN_DEPS := libopencv-dev libturbojpeg0-dev pkg-config
# Tiers: fast (default), slow, ray, browser; gpu tests skip themselves without CUDA.
PYTEST_ARGS ?=
# Python writes sslray's bytecode caches (__pycache__, git-ignored) even where the environment says
# PYTHONDONTWRITEBYTECODE: without them every Ray worker, Tune trial and CLI process compiles
# sslray's sources again (0.45 s each on 2 cores, benchmarks/startup.py --what bytecode; the installed
# packages have theirs from pip).
WRITE_PYC := PYTHONDONTWRITEBYTECODE=

.PHONY: setup demo test test-fast bench docs clean sysdeps

setup: $(STAMP)

# ffcv compiles against OpenCV and libturbojpeg found through pkg-config.
sysdeps:
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then :; else \
	  echo "sslray: installing ffcv build deps ($(DEBIAN_DEPS))"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "sslray: need root (or sudo) to apt-get install $(DEBIAN_DEPS); install them and re-run 'make setup'." >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "sslray: no apt-get here; install OpenCV 4, libturbojpeg and pkg-config dev packages by hand, then re-run 'make setup'." >&2; exit 1; }; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBIAN_DEPS) >/dev/null \
	    || { echo "sslray: apt-get install $(DEBIAN_DEPS) failed; ffcv cannot build without them." >&2; exit 1; }; \
	fi

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q $(TORCH_PINS) numpy
	$(PIP) install -q -e '.[dev]' $(TORCH_PINS)
	$(PY) -c "import ffcv, ray, torch, timm, mlflow, kornia, sklearn; print('sslray setup: torch', torch.__version__, 'ray', ray.__version__, 'ffcv', ffcv.__version__)"
	@touch $(STAMP)

DEMO_DIR ?= demo-data
demo: setup
	$(WRITE_PYC) $(VENV)/bin/sslray demo --data-dir $(DEMO_DIR)

# Every tier that can run on this machine; a shared Ray cluster per session.
test: setup
	$(WRITE_PYC) $(VENV)/bin/python -m pytest -m "not gpu or gpu" -p no:cacheprovider --timeout 1800 $(PYTEST_ARGS)

test-fast: setup
	$(WRITE_PYC) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/loader.py

# docs/config.md and docs/cli.md from the code (tests/test_docgen.py fails when they are stale)
docs: setup
	$(PY) -m sslray.docgen

clean:
	rm -rf $(VENV) mlflow.db mlruns runs demo-data
