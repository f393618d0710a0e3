#!/usr/bin/env bash
# Build the GPU (CUDA) images without a container registry: from a local Debian/Ubuntu base with Python
# (BASE_IMAGE) and PyPI's CUDA torch, whose nvidia-* wheels carry the CUDA runtime; the train image adds
# nvcc from PyPI. Users with a registry build the nvidia/cuda default instead (`docker compose build`).
#
#   eval "$(docker/cpu-images.sh engine)"   # DOCKER, BASE_IMAGE, PIP_CA (the local engine and base)
#   docker/gpu-images.sh wheels             # the CUDA torch and its wheels, downloaded once (~2.7 GB)
#   docker/gpu-images.sh build              # wheels, then microbert-serve:gpu and microbert-train:gpu
#   docker/gpu-images.sh report             # sizes, the layers the two share, disk use
#
# Environment (all optional besides BASE_IMAGE):
#   BASE_IMAGE       a Debian/Ubuntu base with Python >= 3.11 (local-engine.sh makes local/python:bookworm)
#   GPU_TORCH_SPEC   the torch to install (default: the Dockerfiles' TORCH_SPEC, PyPI's CUDA build)
#   WHEELHOUSE       where the wheels are kept between builds (default /var/tmp/microbert-wheels/<spec>-cuda)
#   GPU_TRAIN_IMAGE, GPU_SERVE_IMAGE   tags (default: microbert-train:gpu, microbert-serve:gpu)
#   DOCKER, PIP_CA   as for docker/cpu-images.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# One home for the torch version: the Dockerfiles' default.
DEFAULT_SPEC=$(sed -n 's/^ARG TORCH_SPEC=//p' "$HERE/train.Dockerfile")
TORCH_SPEC=${GPU_TORCH_SPEC:-$DEFAULT_SPEC}
TRAIN_IMAGE=${GPU_TRAIN_IMAGE:-microbert-train:gpu}
SERVE_IMAGE=${GPU_SERVE_IMAGE:-microbert-serve:gpu}
WHEELHOUSE=${WHEELHOUSE:-/var/tmp/microbert-wheels/${TORCH_SPEC//==/-}-cuda}
# shellcheck source=docker/cpu-images.sh
source "$HERE/cpu-images.sh"
log() { echo "gpu-images: $*" >&2; }

need_base() {
  [ -n "${BASE_IMAGE:-}" ] || { log 'set BASE_IMAGE (eval "$(docker/cpu-images.sh engine)" sets it)'; return 2; }
}

wheels() {
  # Downloaded inside the base image, so the wheels fit its Python and platform; the CUDA toolkit's nvcc
  # and headers come along (cuda-toolkit[nvcc,cccl] resolves to the version torch pins).
  need_base
  if compgen -G "$WHEELHOUSE/torch-*.whl" >/dev/null; then
    log "wheelhouse $WHEELHOUSE: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
    return 0
  fi
  mkdir -p "$WHEELHOUSE"
  local start ca=() cert=()
  start=$(date +%s)
  if [ -n "${PIP_CA:-}" ]; then ca=(-v "$PIP_CA:/run/pip_ca.crt:ro"); cert=(--cert /run/pip_ca.crt); fi
  $DOCKER run --rm --network host "${ca[@]}" -v "$WHEELHOUSE:/wheelhouse" "$BASE_IMAGE" sh -ec '
    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip download --disable-pip-version-check --progress-bar off -d /wheelhouse "$@" >/dev/null
    chown -R "$(stat -c %u:%g /wheelhouse)" /wheelhouse' sh "${cert[@]}" "$TORCH_SPEC" 'cuda-toolkit[nvcc,cccl]'
  log "downloaded $(du -sh "$WHEELHOUSE" | cut -f1) into $WHEELHOUSE in $(($(date +%s) - start)) s"
}

build() {
  need_base
  wheels
  # Into the build context (docker/wheels/, git-ignored) as hard links, else copies; never symlinks.
  find "$REPO/docker/wheels" -name '*.whl' -delete
  ln -f "$WHEELHOUSE"/*.whl "$REPO/docker/wheels/" 2>/dev/null || cp "$WHEELHOUSE"/*.whl "$REPO/docker/wheels/"
  local status=0
  build_one serve "$REPO/docker/serve.Dockerfile" "$SERVE_IMAGE" --build-arg WHEELS_ONLY=1 &&
    build_one train "$REPO/docker/train.Dockerfile" "$TRAIN_IMAGE" --build-arg WHEELS_ONLY=1 || status=$?
  find "$REPO/docker/wheels" -name '*.whl' -delete
  return "$status"
}

report() {
  local image
  for image in "$SERVE_IMAGE" "$TRAIN_IMAGE"; do
    echo "== $image: $(($($DOCKER image inspect -f '{{.Size}}' "$image") / 1000000)) MB"
    $DOCKER history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | grep -v '^0B' | cut -c1-150
  done
  local shared
  shared=$(comm -12 <($DOCKER image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$SERVE_IMAGE" | sort) \
    <($DOCKER image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$TRAIN_IMAGE" | sort) | grep -c . || true)
  echo "== layers shared by the two images: $shared"
  echo "== docker system df -v (images)"
  $DOCKER system df -v | sed -n '/^REPOSITORY/,/^$/p' | grep -E "^REPOSITORY|microbert|local/python"
}

case "${1:-}" in
  wheels) wheels ;;
  build) build ;;
  report) report ;;
  *) echo "usage: $0 wheels|build|report" >&2; exit 2 ;;
esac
