# Two commands matter: `make run` and `make test`. Both create .venv on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: run test bench lint install dev clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(VENV)/bin/tokenmill bench reference --output docs/performance.md

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
