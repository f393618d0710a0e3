"""The `microbert` command in a real subprocess: output, exit codes, no tracebacks for user mistakes."""

import json
import subprocess
import sys

import pytest


def microbert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "microbert.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_configs_list_and_show():
    out = microbert("configs", "list")
    assert out.returncode == 0, out.stderr
    assert "bert-base" in out.stdout and "109.51M" in out.stdout
    shown = microbert("configs", "show", "hf-xl", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["vocab_size"] == 25000


def test_unknown_preset_is_a_clear_error():
    out = microbert("configs", "show", "bert-gigantic")
    assert out.returncode != 0
    assert "bert-gigantic" in out.stderr and "bert-tiny" in out.stderr and "Traceback" not in out.stderr


def test_predict_json_and_text(tiny_artifact):
    out = microbert(
        "predict",
        "--model-dir",
        str(tiny_artifact),
        "--json",
        "--top-k",
        "3",
        "the [MASK] is dead",
        "a [MASK] and a [MASK]",
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 2 and len(results[0]) == 3 and len(results[1]) == 2
    text = microbert("predict", "--model-dir", str(tiny_artifact), "the [MASK] is dead")
    assert "=== Testing MLM Model ===" in text.stdout and "1." in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no mask in this text"], "no [MASK]"),
        (["--top-k", "0", "the [MASK]"], "top_k"),
    ],
)
def test_predict_bad_input(tiny_artifact, args, message):
    out = microbert("predict", "--model-dir", str(tiny_artifact), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_predict_bad_model_dir(tmp_path, tiny_artifact):
    out = microbert("predict", "--model-dir", str(tmp_path / "missing"), "the [MASK]")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / "tokenizer.json").write_text("{}")
    out = microbert("predict", "--model-dir", str(broken), "the [MASK]")
    assert out.returncode == 2 and "tokenizer.json" in out.stderr and "Traceback" not in out.stderr


def test_predict_targets_comma_separated_or_repeated(tiny_artifact):
    model = ["predict", "--model-dir", str(tiny_artifact), "--json"]
    comma = microbert(*model, "--targets", "king,lord", "The [MASK] was calm.")
    assert comma.returncode == 0, comma.stderr
    repeated = microbert(*model, "--targets", "king", "--targets", "lord", "The [MASK] was calm.")
    assert repeated.returncode == 0, repeated.stderr
    assert json.loads(comma.stdout) == json.loads(repeated.stdout)
    assert {c["token_str"] for c in json.loads(comma.stdout)[0]} == {"king", "lord"}


def test_predict_space_separated_targets_say_how_to_write_them(tiny_artifact):
    out = microbert("predict", "--model-dir", str(tiny_artifact), "--targets", "king", "lord", "The [MASK].")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--targets king,lord" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_predict_undecodable_argument_is_one_line(tiny_artifact):
    argv: list[str | bytes] = [sys.executable, "-m", "microbert.cli", "predict", "--model-dir"]
    argv += [str(tiny_artifact), b"The \xff [MASK]."]  # bytes, as a shell's $'\xff' passes them
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "not valid UTF-8 (byte 0xff" in out.stderr and len(out.stderr.strip().splitlines()) == 1
