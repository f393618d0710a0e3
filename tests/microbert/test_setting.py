"""Settings declared once (microbert/setting.py): every TrainConfig field carries its section and help,
a help text never spells out a default by hand, and the checks beside the fields report what is wrong
with a run file's values, including values the checks before them let through (true for a number) or
crashed on (null for a count, a list for model_overrides, a number for run_dir)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from microbert.errors import ConfigError
from microbert.run_config import SECTIONS, TrainConfig, resolve
from microbert.setting import Section, declared


def test_every_setting_is_declared_with_a_section_and_help():
    titles = {s.title for s in SECTIONS}
    settings = declared(TrainConfig)
    assert [s.name for s in settings] == [f.name for f in dataclasses.fields(TrainConfig)]
    for s in settings:
        assert s.setting.section in titles, s.name
        assert len(s.setting.help.split()) >= 2, f"{s.name} needs a help text that says what it is"


def test_a_field_declared_without_section_and_help_is_refused():
    @dataclasses.dataclass
    class Partly:
        declared_once: int = Section("data")(1, "a declared setting")
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Partly\.forgotten is declared without a section and help"):
        declared(Partly)


def test_help_names_each_default_through_the_field_not_by_hand():
    by_name = {s.name: s for s in declared(TrainConfig)}
    assert "(default 0; BERT's is 0.1)" in by_name["dropout"].help_text()
    assert by_name["schedule"].help_text() == "LR decay after warm-up: cosine (default), linear, wsd"
    assert by_name["report_to"].help_text().endswith("(default none)")
    for s in by_name.values():
        if s.default is None or s.default == [] or s.default == {}:
            continue
        shown = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
        raw = s.setting.help.replace("{default}", "").replace("{choices}", "")
        written = re.search(rf"default[: ]+{re.escape(shown)}\b|\b{re.escape(shown)} \(default", raw)
        assert written is None, f"{s.name}: write {{default}} in its help instead of {written.group()!r}"


def _resolve_run_file(tmp_path, settings: dict) -> ConfigError:
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(settings))
    flags = {} if "run_dir" in settings else {"run_dir": str(tmp_path / "r")}
    with pytest.raises(ConfigError) as info:
        resolve(profile="cpu", ds_config=None, run_file=str(run_file), flags=flags)
    return info.value


def test_a_boolean_is_not_taken_for_a_number(tmp_path):
    error = _resolve_run_file(tmp_path, {"weight_decay": True, "epochs": True, "grad_clip": False})
    assert error.problems == [
        "weight_decay must be in [0.0, 1.0], got True",
        "grad_clip must be ≥ 0 (0 = off), got False",
        "epochs must be a positive number, got True",
    ]


def test_null_for_a_required_setting_is_reported_not_a_crash(tmp_path):
    error = _resolve_run_file(tmp_path, {"num_gpus": None, "grad_accum": None, "train_batch_size": 64})
    assert error.problems == [
        "grad_accum must be an integer ≥ 1, got None",
        "num_gpus must be an integer ≥ 1, got None",
    ]


def test_a_value_of_the_wrong_kind_is_reported_not_a_crash(tmp_path):
    error = _resolve_run_file(tmp_path, {"model_overrides": ["hidden_size"], "run_dir": 5})
    assert error.problems == [
        "model_overrides must be a JSON object of ModelConfig fields, got ['hidden_size']",
        "run_dir must be a folder path, got 5",
    ]


def test_unknown_run_file_keys_still_fail_with_the_others(tmp_path):
    error = _resolve_run_file(tmp_path, {"learning_rate": 0.1, "lr": 0})
    assert [p.split(": ", 1)[-1] for p in error.problems] == [
        "unknown setting 'learning_rate'",
        "lr must be a positive number, got 0",
    ]
