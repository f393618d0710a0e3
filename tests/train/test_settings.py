"""Configuration resolution: layer precedence, and every problem reported at once without a traceback."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO

from microbert.errors import ConfigError
from microbert.run_config import profile_names, resolve
from train.engine import lr_lambda, oom_message
from train.main import main

EXPECTED_PROFILES = {
    "cpu",
    "a10_1gpu",
    "h100_1gpu",
    "h200_1gpu",
    "h200_8gpu",
    "h200_8gpu_fast",
    "h200_8gpu_quality",
}


def test_bundled_profiles_and_configs_resolve():
    assert set(profile_names()) >= EXPECTED_PROFILES
    for name in EXPECTED_PROFILES:
        r = resolve(profile=name, ds_config=None, run_file=None, flags={})
        assert r.train.seq_len <= r.model_config.max_position_embeddings
    seeds = {
        "v1.json": ("imdb-small", "imdb", 32, 128),
        "v2.json": ("hf-medium", "wikitext-103-raw-v1", 32, 128),
        "v3.json": ("hf-large", "wikitext-103-raw-v1", 32, 128),
        "v4.json": ("hf-xl", "openwebtext", 96, 256),
    }
    for name, (preset, dataset, micro, seq) in seeds.items():
        t = resolve(profile=None, ds_config=name, run_file=None, flags={}).train
        assert (t.model, t.dataset, t.micro_batch_size, t.seq_len, t.lr) == (
            preset,
            dataset,
            micro,
            seq,
            3e-5,
        )
    v4 = resolve(profile=None, ds_config="v4", run_file=None, flags={})
    assert v4.model_config.vocab_size == 25000 and v4.train.max_samples == 10_000_000
    assert v4.train.precision == "bf16" and "optimizer" not in v4.deepspeed


def test_precedence_profile_dsconfig_runfile_flags(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": {"params": {"lr": 0.002}}}))
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"lr": 0.003, "seq_len": 48}))
    base = resolve(profile="cpu", ds_config=None, run_file=None, flags={}).train
    with_ds = resolve(profile="cpu", ds_config=str(ds), run_file=None, flags={}).train
    assert (with_ds.micro_batch_size, with_ds.lr, with_ds.seq_len) == (4, 0.002, base.seq_len)
    with_run = resolve(profile="cpu", ds_config=str(ds), run_file=str(run_file), flags={}).train
    assert (with_run.micro_batch_size, with_run.lr, with_run.seq_len) == (4, 0.003, 48)
    with_flags = resolve(profile="cpu", ds_config=str(ds), run_file=str(run_file), flags={"lr": 0.004}).train
    assert (with_flags.lr, with_flags.seq_len, with_flags.model) == (0.004, 48, base.model)


def test_peak_lr_defaults_to_the_shapes_own_when_no_layer_sets_one(tmp_path):
    def lr(**flags):
        return resolve(profile=None, ds_config=None, run_file=None, flags=flags).train.lr

    assert lr(model="bert-base") == 2e-4  # 5e-4 keeps bert-base on the unigram plateau (BENCHMARKS.md)
    assert lr(model="bert-mini") == lr() == 5e-4
    assert lr(model="bert-base", lr=1e-3) == 1e-3  # any layer's choice wins
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"model": "bert-base", "lr": 3e-4}))
    assert resolve(profile=None, ds_config=None, run_file=str(run_file), flags={}).train.lr == 3e-4
    assert resolve(profile="h200_1gpu", ds_config=None, run_file=None, flags={}).train.lr == 4e-4


def test_all_problems_reported_together(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as info:
        resolve(
            profile="nope",
            ds_config=str(bad_json),
            run_file=None,
            flags={"model": "bert-huge", "train_batch_size": 100, "run_dir": str(blocker / "run")},
        )
    text = str(info.value)
    assert "unknown profile 'nope'" in text and "h200_8gpu" in text  # lists the valid ones
    assert "unknown preset 'bert-huge'" in text and "bert-tiny" in text
    assert "is not valid JSON" in text
    assert "contradictory batch settings" in text
    assert "is a file, not a folder" in text
    assert len(info.value.problems) == 5


def test_missing_ds_config_and_seq_len_above_positions(capsys):
    code = main(["--ds-config", "/nonexistent/ds.json", "--model", "hf-medium", "--seq-len", "512"])
    err = capsys.readouterr().err
    assert code == 2
    assert "/nonexistent/ds.json does not exist" in err
    assert "seq_len 512 is above the 128 positions of model hf-medium" in err


def test_unknown_bundled_ds_config_lists_bundled(capsys):
    assert main(["--ds-config", "v9.json"]) == 2
    assert "v1.json, v2.json, v3.json, v4.json" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_configuration_exits_nonzero_without_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--profile",
            "gpu9000",
            "--model",
            "nope",
            "--run-dir",
            str(blocker / "x"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: invalid configuration:")
    assert "unknown profile 'gpu9000'" in result.stderr and "unknown preset 'nope'" in result.stderr


def test_lr_schedule_warms_up_then_decays_to_floor():
    values = [lr_lambda(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    assert lr_lambda(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)


def test_oom_message_names_the_flags_to_lower():
    t = resolve(profile="cpu", ds_config=None, run_file=None, flags={}).train
    message = oom_message(t, 64)
    assert "--batch-size" in message and "--seq-len" in message and "64" in message


def test_profile_path_is_accepted(tmp_path):
    profile = tmp_path / "mine.json"
    profile.write_text(json.dumps({"model": "bert-mini", "num_gpus": 2}))
    r = resolve(profile=str(profile), ds_config=None, run_file=None, flags={})
    assert (r.train.model, r.train.num_gpus, r.train.run_dir) == ("bert-mini", 2, "runs/mine")
    assert Path(r.train.run_dir).name == "mine"


def test_gpu_profile_without_a_visible_gpu_says_so(monkeypatch, capsys):
    import torch

    from train.main import main

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--profile", "h100_1gpu", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "h100_1gpu" in err and "no GPU is visible" in err and "--profile cpu" in err


def test_position_init_settings_are_checked(tmp_path, capsys):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"position_init": "rotary", "position_init_std": 0}))
    with pytest.raises(ConfigError) as info:
        resolve(profile="cpu", ds_config=None, run_file=str(run_file), flags={})
    text = str(info.value)
    assert "unknown position_init 'rotary'" in text and "sinusoidal" in text
    assert "position_init_std must be in (0, 1], got 0" in text
    with pytest.raises(SystemExit) as exited:  # a flag outside the choices: argparse's usage error
        main(["--position-init", "rotary"])
    assert exited.value.code == 2
    assert "invalid choice: 'rotary'" in capsys.readouterr().err


def test_starting_value_settings_default_to_the_measured_ones_and_are_checked(tmp_path):
    resolved = resolve(profile="cpu", ds_config=None, run_file=None, flags={})
    assert (resolved.train.residual_init, resolved.train.output_bias_init) == ("scaled", "unigram")
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"residual_init": "fixup", "output_bias_init": "ones"}))
    with pytest.raises(ConfigError) as info:
        resolve(profile="cpu", ds_config=None, run_file=str(run_file), flags={})
    text = str(info.value)
    assert "unknown residual_init 'fixup'" in text and "scaled" in text
    assert "unknown output_bias_init 'ones'" in text and "unigram" in text
