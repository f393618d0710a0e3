"""What a run prints and reports: quiet by default, --verbose shows the libraries, a warm-up longer
than the run warns, --report-to tensorboard writes the history's scalars, and the flags parse as the
README shows them."""

from __future__ import annotations

import pytest
from train_helpers import TINY, history, run_train

from train.args import flag_settings, parse

SHORT = [*TINY, "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "4"]


def test_streaming_takes_a_value_or_none_as_in_data_prepare():
    assert flag_settings(parse(["--streaming"]))["streaming"] is True
    assert flag_settings(parse(["--streaming", "false"]))["streaming"] is False
    assert "streaming" not in flag_settings(parse([]))


def test_report_to_and_verbose_flags():
    assert flag_settings(parse(["--report-to", "tensorboard"]))["report_to"] == "tensorboard"
    assert "verbose" not in flag_settings(parse(["--verbose"]))  # a logging switch, not a setting
    with pytest.raises(SystemExit):
        parse(["--report-to", "wandb"])


def test_max_samples_flag_parses_counts_as_data_prepare_does():
    counts = {"10k": 10_000, "1.5M": 1_500_000, "25000": 25_000, "4.1M": 4_100_000, "8.12k": 8_120}
    assert {text: flag_settings(parse(["--max-samples", text]))["max_samples"] for text in counts} == counts
    for bad in ("1.0005k", "1,5k", "all", "lots"):
        with pytest.raises(SystemExit):
            parse(["--max-samples", bad])


@pytest.mark.slow
def test_quiet_run_with_tensorboard_scalars_and_a_warmup_warning(tmp_path, train_env):
    run_dir = tmp_path / "run"
    result = run_train(
        train_env, *SHORT, "--warmup-steps", "10", "--report-to", "tensorboard", "--run-dir", str(run_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("untested optimizer", "built successfully", "Warning", "WARNING"):
        assert noise not in output, output[-3000:]
    assert "warm-up (10 steps) is longer than the run (4 steps)" in result.stderr

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    recorded = history(run_dir)
    for kind in ("train", "eval"):
        for key in ("loss", "lr", "tokens_per_second") if kind == "train" else ("loss", "accuracy"):
            scalars = events.Scalars(f"{kind}/{key}")
            assert [s.step for s in scalars] == [r["step"] for r in recorded[kind]]
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in recorded[kind]], rel=1e-6)
    assert "eval/baseline_accuracy" in events.Tags()["scalars"]


@pytest.mark.slow
def test_verbose_shows_the_library_logs(tmp_path, train_env):
    result = run_train(train_env, *TINY, "--max-steps", "1", "--verbose", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Checking ZeRO support for optimizer=ClippedAdamW" in output
    assert "built successfully" in output
