"""README.md stays true: its commands run, and what it shows is what they print (issue 15).

Every command in a ```sh block is either run here or excused below with the reason (a GPU, the Hub,
Docker, the install itself); a new command that is neither fails the fast test, so it gets one.
The slow tests run the quick start as written, with a 20-step run standing in for the 1,000-step one
(the same profile and data; flags appended, as a user may), then the README's other commands against
that run folder, each from a scratch folder with the session's own data cache. The outputs README.md
shows come from the real quick-start run (`bench/readme_outputs.py` writes them); here they are
checked for the shape the commands print: the same lines, keys and counts. The throughput figures
(`<!-- recorded: NAME -->`) are rendered from the benchmark records in bench/results/; the fast tests
here re-render them and fail on any difference.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import readme_outputs as ro
from bench import readme_records

README = ro.README.read_text(encoding="utf-8")
TINY_QUICKSTART = ["--max-steps", "20", "--warmup-steps", "5", "--eval-every", "10", "--eval-batches", "4"]
STEPS = 20

# (what the command looks like, why it is not run here)
EXCUSED: list[tuple[Callable[[str], bool], str]] = [
    (lambda c: c in ("make install", ". .venv/bin/activate", "make test"), "the install and suite: .ci/run"),
    (lambda c: c.startswith("pip install"), "the install itself: .ci/run installs from scratch"),
    (lambda c: "hf:" in c or "--dataset c4" in c, "needs the Hugging Face Hub (no network here)"),
    (lambda c: " '|' " in c, "a synopsis of sub-commands; tests/microbert/data/test_data_cli.py runs them"),
    (
        lambda c: bool(re.search(r"--profile (h\d|a10)|^deepspeed |--ds-config", c)) and "docker" not in c,
        "needs GPUs (the lead's GPU runs; BENCHMARKS.md)",
    ),
    (
        lambda c: c.startswith(("microbert-serve --model-dir runs/NAME --host", "MICROBERT_MODEL_DIR=")),
        "a variant of the line above; tests/serve/test_server.py covers --workers and MICROBERT_* settings",
    ),
    (
        lambda c: "docker" in c or c == "mkdir -p runs" or (c.startswith("curl") and "top_k" not in c),
        "needs a Docker engine: tests/docker builds the images and runs this",
    ),
]
RUN: list[Callable[[str], bool]] = [
    lambda c: c == "microbert-train --profile cpu",
    lambda c: c.startswith("microbert predict --model-dir runs/"),
    lambda c: c.startswith("microbert data prepare") and "hf:" not in c,
    lambda c: c == "microbert-serve --model-dir runs/NAME",
    lambda c: c.startswith("curl -s localhost:8000/fill-mask") and "top_k" in c,
]


def test_every_command_is_run_or_excused():
    unclassified = []
    for argv in ro.all_commands(README):
        command = shlex.join(argv)
        runs = any(rule(command) for rule in RUN)
        excused = [reason for rule, reason in EXCUSED if rule(command)]
        if runs == bool(excused):  # neither, or both
            unclassified.append(command)
    assert not unclassified, "classify these README commands in tests/test_readme.py: " + "; ".join(
        unclassified
    )


def test_marked_outputs_and_figures_are_the_scripts():
    markers = [b.marker for b in ro.blocks(README) if b.marker and b.marker.startswith("output: ")]
    assert sorted(markers) == sorted(f"output: {name}" for name in ro.OUTPUTS)
    assert sorted(m.group("name") for m in ro.FIGURE.finditer(README)) == sorted(ro.FIGURES)
    figure = next(m.group("value") for m in ro.FIGURE.finditer(README) if m.group("name") == "padding")
    assert re.fullmatch(r"\d+\.\d{3}% padding, at 512 \d+\.\d{3}%", figure), figure
    recorded = re.findall(r"^<!-- recorded: ([\w-]+) -->$", README, re.M)
    assert sorted(recorded) == sorted(ro.RECORDED)


# --- the figures rendered from bench/results/ (offline, nothing run) --------------------------------------
SCRIPT = [sys.executable, str(ro.REPO / "bench" / "readme_outputs.py"), "--records-only", "--check"]


def _check(readme: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [*SCRIPT, "--readme", str(readme), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _region(text: str, name: str) -> str:
    return text[text.index(f"<!-- recorded: {name} -->") :].split("<!-- /recorded -->")[0]


def test_recorded_figures_are_the_records():
    assert ro.render_recorded(README) == README, "stale: run python bench/readme_outputs.py --records-only"


def _bumped(line: str, start: int) -> str:
    """`line` with its first digit at or after `start` changed."""
    i = next(i for i in range(start, len(line)) if line[i].isdigit())
    return line[:i] + str((int(line[i]) + 1) % 10) + line[i + 1 :]


@pytest.mark.parametrize("where", ["a table cell", "the caption's load average"])
def test_a_changed_digit_fails_the_check(tmp_path, where):
    copy = tmp_path / "README.md"
    copy.write_text(README, encoding="utf-8")
    assert _check(copy).returncode == 0
    region = _region(README, "serve-cpu")
    if where == "a table cell":
        line = next(x for x in region.splitlines() if x.startswith("| `microbert-serve"))
        edited = _bumped(line, line.index(" | 64 | ") + len(" | 64 | "))  # its sentences/s
    else:
        line = next(x for x in region.splitlines() if "load average" in x)
        edited = _bumped(line, line.index("load average"))
    copy.write_text(README.replace(line, edited, 1), encoding="utf-8")
    result = _check(copy)
    assert result.returncode == 1
    assert f"-{edited}" in result.stdout and f"+{line}" in result.stdout  # the diff shows the fix
    assert copy.read_text(encoding="utf-8") != README  # --check writes nothing


def test_a_newer_record_replaces_its_row_only(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ro.REPO / "bench" / "results", results)
    records = readme_records.load(results)
    old = next(  # the row as the README shows it now: its newest record
        r
        for r in readme_records.serve_cpu_rows(records)
        if r["impl"] == "microbert-serve --workers 2" and r["mode"] == "single" and r["concurrency"] == 64
        and not r.get("settings")
    )  # fmt: skip
    later = "2100-01-01"  # after every record measured
    assert all(str(r.get("date", "")) < later for r in records)
    new = {**old, "date": later, "commit": "abc1234", "sentences_per_second": 1711.4, "p99_ms": 149.0}
    (results / f"{later}-cpu.json").write_text(json.dumps([new]))
    before, after = _region(README, "serve-cpu"), _region(ro.render_recorded(README, results), "serve-cpu")
    table = [[line for line in text.splitlines() if line.startswith("|")] for text in (before, after)]
    rows = [(a, b) for a, b in zip(*table, strict=True) if a != b]
    assert len(rows) == 1 and "| 1,711 | 0 |" in rows[0][1] and "| 149 ms |" in rows[0][1]
    assert later in after and "abc1234" in after
    assert "is met: the best such row within that p99 answers 1,711/s" in " ".join(after.split())
    copy = tmp_path / "README.md"
    copy.write_text(README, encoding="utf-8")
    assert _check(copy, "--results", str(results)).returncode == 1


def test_data_speeds_come_from_the_newest_data_record(tmp_path):
    base = {"bench": "data", "device": "cpu", "torch": "2.13.0+cpu", "cpu_cores": 4, "affinity": 2}
    run = {
        "prepare": {"text_mb": 6.81, "tokenize_pack_mb_per_s": 6.42},
        "loader": {"batch": "64x128", "loader_tokens_per_s": 11_734_000},
        "big": {
            "source_gb": 1.0,
            "prepare_seconds": 45.6,
            "prepare_mb_per_s": 21.9,
            "peak_rss_gb_all_processes": 0.661,
        },
        "load_average_before": 0.41,
        "load_average_after": 1.93,
    }
    results = tmp_path / "results"
    results.mkdir()
    older = {**base, **run, "date": "2026-11-30", "commit": "0000000"}
    newest = {**base, **run, "date": "2026-12-02", "commit": "abc1234"}
    (results / "2026-12-02-cpu.json").write_text(json.dumps([older, newest]))
    speed = " ".join(_region(ro.render_recorded(README, results), "data-speed").split())
    shown_figures = (
        "2026-12-02, commit abc1234",
        "2 of 4 cores",
        "load average 0.41–1.93",
        "6.4 MB/s",
        "11.7 M tokens/s of masked 64x128",
        "1.0 GB text file prepares in 46 s",
        "0.66 GB peak",
    )
    for shown in shown_figures:
        assert shown in speed, (shown, speed)
    assert "0000000" not in speed


# --- the commands, run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A scratch folder holding runs/cpu from the README's quick start (20 steps), and its env."""
    cwd = tmp_path_factory.mktemp("readme")
    env = dict(os.environ)
    env.update(
        PATH=f"{ro.BIN}{os.pathsep}{env.get('PATH', '')}",
        DS_ACCELERATOR="cpu",
        MICROBERT_NO_BAR="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(ro.REPO),
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    train, _ = ro.quickstart(README)
    ro.run([*train, *TINY_QUICKSTART], cwd=cwd, env=env, timeout=600)
    return cwd, env


def _readme_commands(prefix: str) -> list[list[str]]:
    return [a for a in ro.all_commands(README) if shlex.join(a).startswith(prefix)]


def _on_quickstart_run(argv: list[str]) -> list[str]:
    return [a.replace("runs/NAME", ro.RUN_FOLDER) for a in argv]


def _normalized(listing: str) -> list[str]:
    """`  1. word   0.1234` → `  N. TOKEN SCORE`: the layout, without the model's choices."""
    return [
        re.sub(r"^(\s+)\d+\. \S+\s+\d\.\d{4}$", r"\1N. TOKEN SCORE", line) for line in listing.splitlines()
    ]


def _shape(value: object) -> object:
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


@pytest.mark.slow
def test_quickstart_folder_matches_the_layouts_shown(workdir):
    cwd, _ = workdir
    run_dir = cwd / ro.RUN_FOLDER
    assert json.loads((run_dir / "status.json").read_text())["step"] == STEPS
    outputs_block = next(b for b in ro.blocks(README) if b.text.startswith("resolved_config.json"))
    for line in outputs_block.text.splitlines():
        if line.startswith(" "):
            continue  # a description's continuation
        names, description = re.split(r"\s{2,}", line, maxsplit=1)
        if description.startswith("with --"):
            continue  # written only when a flag asks for it
        for name in names.split(", "):
            path = "export/" + name if name == "latest" else name
            assert list(run_dir.glob(path.replace("step-N", "step-*").rstrip("/"))), f"{path} in {run_dir}"
    artifact_block = next(b for b in ro.blocks(README) if b.text.startswith("runs/<name>/export/step-<N>/"))
    listed = {w for w in artifact_block.text.split() if "." in w and "<" not in w}
    export = run_dir / "export" / f"step-{STEPS}"
    assert listed == {p.name for p in export.iterdir()}
    assert (run_dir / "export" / "latest").is_file()


@pytest.mark.slow
def test_predict_commands(workdir):
    cwd, env = workdir
    commands = _readme_commands("microbert predict --model-dir runs/")
    assert len(commands) == 4  # the quick start's and the Predict section's three
    for argv in commands:
        out = ro.run(_on_quickstart_run(argv), cwd=cwd, env=env, timeout=120)
        if "--json" in argv:
            results = json.loads(out)
            assert len(results) == 2 and len(results[1]) == 2  # one text with two masks: a list per mask
        else:
            assert out.startswith("=== Testing MLM Model ===") and "Input: The [MASK]" in out
        if "--targets" in argv:  # only the targets are scored
            scored = json.loads(ro.run([*_on_quickstart_run(argv), "--json"], cwd=cwd, env=env))[0]
            assert {c["token_str"] for c in scored} <= {"sea", "land"}


@pytest.mark.slow
def test_outputs_shown_have_the_shape_the_commands_print(workdir):
    cwd, env = workdir
    printed = ro.outputs(README, cwd=cwd, run_dir=ro.RUN_FOLDER, env=env)
    shown = {name: ro.output_block(README, name).text for name in ro.OUTPUTS}
    assert _normalized(shown["quickstart-predict"]) == _normalized(printed["quickstart-predict"])
    shown_json, printed_json = json.loads(shown["curl-fill-mask"]), json.loads(printed["curl-fill-mask"])
    assert _shape(shown_json) == _shape(printed_json)
    assert len(printed_json) == 3 and [c["score"] for c in printed_json] == sorted(
        (c["score"] for c in printed_json), reverse=True
    )
    # and the script writes exactly those outputs into a README
    copy = cwd / "README.md"
    copy.write_text(README, encoding="utf-8")
    script = [sys.executable, str(ro.REPO / "bench" / "readme_outputs.py"), "--readme", str(copy)]
    subprocess.run([*script, "--no-figures"], cwd=cwd, env=env, check=True, capture_output=True, timeout=300)
    rewritten = copy.read_text(encoding="utf-8")
    for name in ro.OUTPUTS:
        assert ro.output_block(rewritten, name).text == printed[name].rstrip("\n")
    check = subprocess.run([*script, "--no-figures", "--check"], cwd=cwd, env=env, capture_output=True)
    assert check.returncode == 0, check.stdout[-2000:]


@pytest.mark.slow
def test_serving_commands_and_client(workdir):
    cwd, env = workdir
    assert ["microbert-serve", "--model-dir", "runs/NAME"] in ro.all_commands(README)  # what is run here
    client_block = next(b for b in ro.blocks(README) if b.info == "python" and "InferenceClient" in b.text)
    with ro.serving(Path(ro.RUN_FOLDER), cwd=cwd, env=env) as port:
        curl = ro.on_port(ro.curl_fill_mask(README), port)
        assert len(json.loads(ro.run(curl, cwd=cwd, env=env))) == 3
        script = ro.on_port([client_block.text], port)[0]
        script += "\nprint(client.fill_mask('The [MASK] was calm.', targets=['sea', 'land']))\n"
        # HF_HUB_OFFLINE=1 (the suite's) blocks huggingface_hub's requests, loopback ones too
        client_env = {**env, "HF_HUB_OFFLINE": "0"}
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=cwd,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "token_str='sea'" in result.stdout or "token_str='land'" in result.stdout


@pytest.mark.slow
def test_artifact_snippet_loads_in_transformers(workdir):
    cwd, env = workdir
    (snippet,) = [
        b.text for b in ro.blocks(README) if b.info == "python" and "AutoModelForMaskedLM" in b.text
    ]
    snippet = snippet.replace("runs/NAME/export/step-1000", f"{ro.RUN_FOLDER}/export/step-{STEPS}")
    snippet += "\nprint(fill('The [MASK] of the king was great.')[0]['token_str'])\n"
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.slow
def test_data_commands(workdir):
    cwd, env = workdir
    texts = cwd / "my-texts"
    texts.mkdir(exist_ok=True)
    corpus = gzip.decompress((ro.REPO / "microbert" / "corpus" / "tinyshakespeare.txt.gz").read_bytes())
    (texts / "a.txt").write_bytes(corpus[:200_000])
    (texts / "b.txt").write_bytes(corpus[200_000:400_000])
    imdb = cwd / "imdb_train.jsonl.gz"  # a local copy in the Hub's schema, as the README describes
    with gzip.open(imdb, "wt", encoding="utf-8") as f:
        for i, paragraph in enumerate(corpus.decode().split("\n\n")[:300]):
            f.write(json.dumps({"text": paragraph, "label": i % 2}) + "\n")
    data_env = {**env, "MICROBERT_DATASET_IMDB": str(imdb)}
    commands = [a for a in _readme_commands("microbert data prepare") if "hf:" not in shlex.join(a)]
    assert len(commands) == 3
    for argv in commands:
        out = ro.run(argv, cwd=cwd, env=data_env, timeout=300)
        if "--json" in argv:
            result = json.loads(out)
            shown = "cache_key path documents tokens sequences seconds cached train_sequences "
            shown += "eval_sequences padding_fraction vocab_size"
            assert set(shown.split()) <= set(result) and result["documents"] > 0
        else:
            assert "cache_key" in out
    figure = ro.padding_figure(cwd=cwd, cache_dir=None)
    shown = next(m.group("value") for m in ro.FIGURE.finditer(README) if m.group("name") == "padding")
    assert figure == shown, "README's padding figure is stale: run python bench/readme_outputs.py"
    shutil.rmtree(texts)
