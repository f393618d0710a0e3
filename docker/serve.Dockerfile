# The fill-mask service: `microbert-serve` on port 8000, as a non-root user.
#
# GPU (default): a CUDA runtime base and PyPI's torch (a CUDA 13 build, matching the base).
#   docker build -f docker/serve.Dockerfile -t microbert-serve .
# CPU, from the same file: any Debian/Ubuntu base with Python >= 3.11 and the CPU build of torch, by exact
# version, from a local wheel in docker/wheels/ or from an index:
#   docker build -f docker/serve.Dockerfile -t microbert-serve:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# A build machine that trusts its own CA: pass it as a secret, never a layer: --secret id=pip_ca,src=FILE.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# --- base: Python and its venv module (the CUDA images have neither) ---------------------------------
FROM ${BASE_IMAGE} AS base
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# --- deps: the virtual environment with every dependency, installed before any source is copied, ----
# so a change to the code reuses this layer.
FROM base AS deps
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, by exact version: a CPU image that asked for +cpu fails here if the wheel is missing,
# instead of quietly downloading the multi-GB CUDA build. (Pinned, through TORCH_SPEC.)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    pip install --find-links /wheels "$TORCH_SPEC" \
    && python3 -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
       > /opt/venv/torch-constraint.txt
COPY pyproject.toml docker/requirements.py /src/
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 /src/requirements.py /src/pyproject.toml --build > /src/build-requirements.txt \
    && python3 /src/requirements.py /src/pyproject.toml serve > /src/requirements.txt \
    && pip install -r /src/build-requirements.txt \
    && pip install --constraint /opt/venv/torch-constraint.txt -r /src/requirements.txt

# --- wheel: the project itself ------------------------------------------------------------------------
FROM deps AS wheel
COPY README.md /src/
COPY microbert /src/microbert
COPY serve /src/serve
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# --- the image: the base, the venv and the project wheel; nothing else from the build ------------------
FROM base
ARG APP_UID=1000
# CUDA's Ubuntu images ship a user with uid 1000: make room for ours, whose uid matches most hosts' first
# user, so files in a mounted run folder belong to them.
RUN if getent passwd "$APP_UID" >/dev/null; then userdel --remove "$(id -nu "$APP_UID")"; fi \
    && useradd --create-home --uid "$APP_UID" --user-group --shell /usr/sbin/nologin microbert
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-deps --no-cache-dir /dist/*.whl
ENV PATH=/opt/venv/bin:$PATH \
    MICROBERT_HOST=0.0.0.0 \
    MICROBERT_PORT=8000 \
    MICROBERT_MODEL_DIR=/model
USER ${APP_UID}
WORKDIR /home/microbert
EXPOSE 8000
# /ready answers 200 once the model is loaded, 503 before; urllib raises on anything but 2xx.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('MICROBERT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["microbert-serve"]
