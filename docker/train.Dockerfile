# The trainer: entrypoint `microbert-train`, as a non-root user, in /app (which holds train/main.py, so
# `deepspeed train/main.py --ds-config v4.json` works too: `docker run --entrypoint deepspeed ...`).
#
# GPU (default): a CUDA *devel* base, because DeepSpeed compiles its fused ops with nvcc at first use,
# and PyPI's torch (a CUDA 13 build, matching the base's nvcc).
#   docker build -f docker/train.Dockerfile -t microbert-train .
# GPU without a registry: any Debian/Ubuntu base with Python >= 3.11; PyPI's torch brings the CUDA
# libraries as nvidia-* wheels and the image adds nvcc from PyPI (docker/gpu-images.sh builds it so):
#   docker build -f docker/train.Dockerfile -t microbert-train:gpu --build-arg BASE_IMAGE=debian-python-base .
# CPU, from the same file (see docker/serve.Dockerfile for the arguments):
#   docker build -f docker/train.Dockerfile -t microbert-train:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Volumes: /runs (run folders: checkpoints, exports, logs), /cache/huggingface (HF_HOME: Hub downloads),
# /cache/microbert (MICROBERT_CACHE_DIR: tokenized shards).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04

# --- python: Python, a venv, torch and the project's core dependencies. The same instructions open
# docker/train.Dockerfile and docker/serve.Dockerfile, so one image's build reuses the other's layers
# and both share them on disk. Dependencies come before any source: a code change reuses them.
FROM ${BASE_IMAGE} AS python
# The CUDA images have no Python; Debian's python images have it and its venv module.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
# WHEELS_ONLY=1: torch and all it needs come from docker/wheels/ (a wheelhouse: docker/gpu-images.sh
# downloads the CUDA build's ~2.7 GB once), none from an index.
ARG WHEELS_ONLY=
# torch alone first, by exact version (TORCH_SPEC): a CPU image that asked for +cpu fails here if the
# wheel is missing, instead of quietly downloading the multi-GB CUDA build. Later installs keep it.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    if [ -n "$WHEELS_ONLY" ]; then export PIP_NO_INDEX=1; fi; \
    pip install --find-links /wheels "$TORCH_SPEC" \
    && python3 -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
       > /opt/venv/constraints.txt
WORKDIR /opt/venv/requirements
COPY pyproject.toml docker/requirements.py ./
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 requirements.py pyproject.toml build > build.txt \
    && python3 requirements.py pyproject.toml core > core.txt \
    && pip install --constraint /opt/venv/constraints.txt -r build.txt -r core.txt

# --- trainer: DeepSpeed -------------------------------------------------------------------------------
FROM python AS trainer
# DeepSpeed is an sdist whose setup imports torch: build it against the torch above, not in an isolated
# environment (which would download another torch).
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 requirements.py pyproject.toml train > train.txt \
    && pip install --no-build-isolation --constraint /opt/venv/constraints.txt -r train.txt
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# --- ops: on the CPU accelerator, DeepSpeed's shared-memory op, compiled here once instead of in every
# new container (a minute on two cores), so the CPU image needs no compiler.
FROM trainer AS ops
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /opt/torch_extensions \
    && if python3 -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then \
      python3 -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'; \
    fi

# --- the image ----------------------------------------------------------------------------------------
FROM trainer
ARG WHEELS_ONLY=
# A CUDA torch: what DeepSpeed's JIT-compiled CUDA ops need, Python's headers and a C++ compiler, and
# nvcc. The devel base has nvcc in /usr/local/cuda; on any other base (a plain Debian or Ubuntu one, the
# build without a registry) nvcc and the CUDA headers come from PyPI through torch's own CUDA metapackage,
# `cuda-toolkit`, at the version torch pins (so nvcc matches torch's CUDA), and /usr/local/cuda points at
# that tree, where torch's extension builder (CUDA_HOME) and DeepSpeed look. A CPU torch gets none of it.
# hadolint ignore=DL3008,DL3013
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if python3 -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-dev g++ \
      && rm -rf /var/lib/apt/lists/* \
      && if [ ! -x /usr/local/cuda/bin/nvcc ]; then \
        if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
        if [ -n "$WHEELS_ONLY" ]; then export PIP_NO_INDEX=1; fi; \
        toolkit=$(python3 -c 'from importlib.metadata import version; print(version("cuda-toolkit"))') \
        && pip install --find-links /wheels --constraint /opt/venv/constraints.txt "cuda-toolkit[nvcc,cccl]==$toolkit" \
        && major=$(python3 -c 'import torch; print(torch.version.cuda.split(".")[0])') \
        && cuda=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0] + '/cu$major')") \
        && ln -s "libcudart.so.$major" "$cuda/lib/libcudart.so" \
        && ln -s "$cuda" /usr/local/cuda; \
      fi \
      && /usr/local/cuda/bin/nvcc --version; \
    fi
ENV CUDA_HOME=/usr/local/cuda PATH=$PATH:/usr/local/cuda/bin
ARG APP_UID=1000
# CUDA's Ubuntu images ship a user with uid 1000: make room for ours, whose uid matches most hosts' first
# user, so files in a mounted run folder belong to them. The volume folders belong to it, so named
# volumes start writable.
RUN if getent passwd "$APP_UID" >/dev/null; then userdel --remove "$(id -nu "$APP_UID")"; fi \
    && useradd --create-home --uid "$APP_UID" --user-group --shell /bin/bash microbert \
    && mkdir -p /runs /cache/huggingface /cache/microbert \
    && chown microbert:microbert /runs /cache/huggingface /cache/microbert
# The user takes the op's build lock at load time, so the folder is its own.
COPY --from=ops --chown=${APP_UID} /opt/torch_extensions /opt/torch_extensions
WORKDIR /app
COPY pyproject.toml README.md ./
COPY microbert microbert
COPY train train
# runs/<profile>, the trainer's default run folder, lands in the /runs volume.
RUN pip install --no-deps --no-build-isolation --no-cache-dir -e . \
    && ln -s /runs /app/runs
ENV HF_HOME=/cache/huggingface MICROBERT_CACHE_DIR=/cache/microbert
VOLUME ["/runs", "/cache/huggingface", "/cache/microbert"]
USER ${APP_UID}
ENTRYPOINT ["microbert-train"]
CMD ["--help"]
