"""`microbert configs list|show` for hardware profiles, and the import direction it must keep."""

from __future__ import annotations

import json
import subprocess
import sys

from train_helpers import REPO

from microbert.cli import main


def test_configs_list_shows_profiles(capsys):
    assert main(["configs", "list"]) == 0
    out = capsys.readouterr().out
    assert "Hardware profiles" in out
    for name in (
        "cpu",
        "a10_1gpu",
        "h100_1gpu",
        "h200_1gpu",
        "h200_8gpu",
        "h200_8gpu_fast",
        "h200_8gpu_quality",
    ):
        assert f"\n{name} " in out
    assert main(["configs", "list", "--json"]) == 0
    profiles = {p["name"]: p for p in json.loads(capsys.readouterr().out)["profiles"]}
    assert profiles["h200_8gpu"]["num_gpus"] == 8 and profiles["cpu"]["dataset"] == "embedded"


def test_configs_show_profile_prints_resolved_config_and_launch_command(capsys):
    assert main(["configs", "show", "h200_8gpu"]) == 0
    out = capsys.readouterr().out
    assert "microbert-train --profile h200_8gpu" in out
    assert "deepspeed --num_gpus 8 --module train.main --profile h200_8gpu" in out
    assert "max_steps" in out and "bert-base" in out
    assert main(["configs", "show", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train"]["dataset"] == "embedded" and data["launch"] == ["microbert-train --profile cpu"]


def test_configs_show_unknown_name_lists_presets_and_profiles(capsys):
    assert main(["configs", "show", "h900_64gpu"]) == 2
    err = capsys.readouterr().err
    assert "bert-tiny" in err and "h200_8gpu_fast" in err


def test_configs_never_import_the_trainer_or_deepspeed():
    code = (
        "import sys; from microbert.cli import main; main(['configs', 'show', 'h200_8gpu']);"
        "bad = [m for m in sys.modules if m == 'train' or m.startswith(('train.', 'deepspeed'))];"
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_cpu_profile_is_listed_as_a_cpu_not_as_one_gpu(capsys):
    assert main(["configs", "list"]) == 0
    cpu_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu "))
    assert cpu_row.split()[1:4] == ["CPU", "(2+", "cores)"]
    assert main(["configs", "show", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("profile cpu: CPU (2+ cores), 1 process, model bert-tiny")
    assert main(["configs", "show", "h200_8gpu"]) == 0
    assert "8x H200 141 GB, 8 processes, one per GPU" in capsys.readouterr().out


def test_configs_show_prints_the_run_plan_with_what_only_the_launch_knows(capsys):
    assert main(["configs", "show", "h200_8gpu"]) == 0
    out = capsys.readouterr().out
    plan = out[out.index("\nplan (") : out.index("\ndeepspeed (")]
    rows = {
        line.split()[0]: " ".join(line.split()[1:])
        for line in plan.splitlines()[2:]
        if line.startswith("    ")
    }
    assert rows["world_size"] == "8" and rows["precision"] == "bf16"
    assert (
        rows["micro_batch_size"] == "auto: resolved at launch"
        and rows["train_batch_size"] == rows["micro_batch_size"]
    )
    assert (rows["total_steps"], rows["warmup_steps"], rows["shape"]) == ("40000", "2000", "cosine")
    assert main(["configs", "show", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["batch"]["train_batch_size"] == 128 and plan["placement"]["device"] == "cpu"
    assert plan["schedule"]["total_steps"] is None and plan["schedule"]["warmup_s"] == 27.0  # 6% of 450 s
    assert plan["data"]["vocab_size"] == "auto: resolved at launch"  # the tokenizer's size, once prepared
