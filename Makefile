# Targets assume the project's virtual environment (.venv, made by `make install`).
PY ?= .venv/bin/python
export DS_ACCELERATOR ?= cpu

.PHONY: install test lint format demo gpu-images

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

# The embedded-corpus demo: train the cpu profile from scratch, time it, compare its held-out
# masked-token accuracy with the most-frequent-token guess, and fill a few masks.
demo:
	@start=$$(date +%s); \
	.venv/bin/microbert-train --profile cpu --resume never || exit $$?; \
	echo "== wall time: $$(( $$(date +%s) - start )) s (data preparation, training, checkpoints, export)"; \
	.venv/bin/microbert eval --model-dir runs/cpu --dataset embedded && \
	.venv/bin/microbert predict --model-dir runs/cpu "The [MASK] of the king was great." "I will not [MASK] it."

# The GPU (CUDA) images without a registry, from a local Debian base and PyPI's CUDA torch, then their
# smoke test on this machine (no GPU needed) and their sizes. Needs a Docker engine: the running one, or
# ../shared/docker/local-engine.sh's as root. Cold: ~2.7 GB of wheels (downloaded once), ~10 min on 2 cores.
gpu-images:
	@eval "$$(bash docker/cpu-images.sh engine)" && \
	start=$$(date +%s) && bash docker/gpu-images.sh build && \
	echo "== built in $$(( $$(date +%s) - start )) s" && \
	MICROBERT_GPU_IMAGES=1 $(PY) -m pytest -q tests/docker/test_gpu_images.py && \
	bash docker/gpu-images.sh report
