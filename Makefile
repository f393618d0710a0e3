# Targets assume the project's virtual environment (.venv, made by `make install`).
PY ?= .venv/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: install test lint format demo

install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[train,serve,dev]'

test:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
