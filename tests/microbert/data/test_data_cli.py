"""`microbert data prepare` and `microbert cache`: JSON output, and user mistakes without tracebacks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microbert.cli import main
from microbert.data import cache as data_cache

REPO = Path(__file__).resolve().parents[3]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _prepare_argv(folder: Path) -> list[str]:
    """`microbert data prepare` of a small text folder, with a JSON report."""
    return ["data", "prepare", "--dataset", str(folder), "--seq-len", "32", "--vocab-size", "300", "--json"]


def test_prepare_json_then_cache_hit(capsys: pytest.CaptureFixture[str], text_folder: Path) -> None:
    argv = _prepare_argv(text_folder)
    code, out, _ = _run(capsys, *argv)
    first = json.loads(out)
    assert code == 0
    assert {"cache_key", "path", "documents", "tokens", "sequences", "seconds", "cached"} <= set(first)
    assert first["cached"] is False and first["documents"] == 300 and first["sequences"] > 0
    code, out, _ = _run(capsys, *argv, "--streaming")
    second = json.loads(out)
    assert second["cached"] is True and second["cache_key"] == first["cache_key"]
    assert second["seconds"] < 1.0


def test_cache_info_usage_clear(
    capsys: pytest.CaptureFixture[str], text_folder: Path, cache_dir: Path
) -> None:
    _run(capsys, *_prepare_argv(text_folder))
    code, out, _ = _run(capsys, "cache", "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["cache_dir"] == str(cache_dir)
    [entry] = info["entries"]
    assert entry["complete"] and entry["seq_len"] == 32 and entry["bytes"] > 0
    code, out, _ = _run(capsys, "cache", "usage", "--json")
    assert json.loads(out)["datasets_bytes"] == entry["bytes"]
    code, out, err = _run(capsys, "cache", "clear")  # stdin is not a terminal: must not delete silently
    assert code == 2 and "--yes" in err and (cache_dir / "datasets" / entry["cache_key"]).is_dir()
    code, out, _ = _run(capsys, "cache", "clear", "--yes", "--json")
    assert code == 0 and entry["cache_key"] in json.loads(out)["removed"]
    assert data_cache.list_entries(cache_dir) == []
    code, _, err = _run(capsys, "cache", "clear", "--yes", "no-such-key")
    assert code == 2 and "no cache entry no-such-key" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt does not exist"),
        (["--dataset", "wikitext-9000"], "valid datasets: c4, embedded, embedded-heldout, imdb"),
        (["--dataset", "EMPTYDIR"], "holds no data files"),
        (["--dataset", "BADFILE"], "is not UTF-8 text"),
        (["--seq-len", "abc"], "--seq-len must be an integer"),
        (["--seq-len", "2"], "seq_len must be an integer from 8"),
        (["--max-samples", "lots", "--streaming", "maybe"], "--streaming must be true or false"),
        (["--dataset", "hf:someone/some-dataset"], "not reachable"),
    ],
)
def test_bad_input_is_one_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.txt").write_bytes("déjà vu".encode("latin-1"))
    argv = [
        {"EMPTYDIR": str(tmp_path / "empty"), "BADFILE": str(tmp_path / "bad.txt")}.get(a, a) for a in argv
    ]
    code, out, err = _run(capsys, "data", "prepare", "--vocab-size", "300", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_full_disk_through_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text_folder: Path
) -> None:
    def no_space(handle, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_cache, "_write", no_space)
    code, _, err = _run(capsys, "data", "prepare", "--dataset", str(text_folder), "--vocab-size", "300")
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert data_cache.list_entries(data_cache.cache_root())[0]["complete"] is False


def test_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "MICROBERT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "microbert.cli", "data", "prepare", "--dataset", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
