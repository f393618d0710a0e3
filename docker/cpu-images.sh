#!/usr/bin/env bash
# Build the CPU images of the trainer and the service (what the container tests and CI run).
#
#   eval "$(docker/cpu-images.sh engine)"   # a Docker engine: the running one, or, on a build machine
#                                           # with no registry, ../shared/docker/local-engine.sh's
#   docker/cpu-images.sh build              # microbert-train:cpu and microbert-serve:cpu
#
# Environment (all optional):
#   DOCKER        the docker client (default: docker)
#   BASE_IMAGE    a Debian/Ubuntu base with Python >= 3.11 (default: python:3.11-slim-bookworm)
#   PIP_CA        a CA bundle pip inside the build must trust; passed as a BuildKit secret, never a layer
#   TORCH_WHEEL   a local CPU torch wheel (default: /opt/wheels/torch-2.13.0+cpu-*.whl when present);
#                 without one, torch comes from TORCH_INDEX_URL (default: PyTorch's CPU index)
#   TORCH_SPEC    the exact torch to install (default: torch==2.13.0+cpu)
#   TRAIN_IMAGE, SERVE_IMAGE   tags (default: microbert-train:cpu, microbert-serve:cpu)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DOCKER=${DOCKER:-docker}
TRAIN_IMAGE=${TRAIN_IMAGE:-microbert-train:cpu}
SERVE_IMAGE=${SERVE_IMAGE:-microbert-serve:cpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
log() { echo "cpu-images: $*" >&2; }

engine() {
  # On the project's build machines (no registry) the shared script provides the engine and a base image.
  local script=$REPO/../shared/docker/local-engine.sh
  if [ -f "$script" ] && [ "$(id -u)" = 0 ]; then
    bash "$script" start
  elif DOCKER_BUILDKIT=1 $DOCKER info >/dev/null 2>&1; then
    echo "export DOCKER=$DOCKER DOCKER_BUILDKIT=1"
  else
    log "no Docker engine answers ($DOCKER info) and no $script to start one"
    return 1
  fi
}

build_one() {  # name dockerfile tag [more docker build arguments]
  local name=$1 dockerfile=$2 tag=$3 start logfile
  shift 3
  local args=(--network host -f "$dockerfile" -t "$tag" --build-arg "BASE_IMAGE=$BASE_IMAGE"
    --build-arg "TORCH_SPEC=$TORCH_SPEC" "$@")
  [ -z "${PIP_CA:-}" ] || args+=(--secret "id=pip_ca,src=$PIP_CA")
  logfile=$(mktemp -t "microbert-build-$name.XXXXXX.log")
  start=$(date +%s)
  if ! DOCKER_BUILDKIT=1 $DOCKER build --progress plain "${args[@]}" "$REPO" >"$logfile" 2>&1; then
    tail -n 60 "$logfile" >&2
    log "building $tag failed (full log: $logfile)"
    return 1
  fi
  local size
  size=$($DOCKER image inspect -f '{{.Size}}' "$tag")
  log "built $tag in $(($(date +%s) - start)) s, $((size / 1000000)) MB"
  rm -f "$logfile"
}

build() {
  BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
  if [ -z "${TORCH_WHEEL:-}" ]; then
    TORCH_WHEEL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  fi
  # The build context reaches only what .dockerignore lets in: the wheel goes into docker/wheels/
  # (git-ignored), as a hard link when it can (no copy of 190 MB), else a copy; never a symlink.
  find "$REPO/docker/wheels" -name '*.whl' -delete
  if [ -n "$TORCH_WHEEL" ]; then
    ln -f "$TORCH_WHEEL" "$REPO/docker/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$REPO/docker/wheels/"
  fi
  local index=()
  [ -n "$TORCH_WHEEL" ] || index=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
  build_one serve "$REPO/docker/serve.Dockerfile" "$SERVE_IMAGE" "${index[@]}"
  build_one train "$REPO/docker/train.Dockerfile" "$TRAIN_IMAGE" "${index[@]}"
}

# docker/gpu-images.sh sources this file for engine and build_one.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    engine) engine ;;
    build) build ;;
    *) echo "usage: $0 engine|build" >&2; exit 2 ;;
  esac
fi
