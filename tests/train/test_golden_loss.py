"""Golden loss: a tiny run on fixed data reaches the loss recorded in `golden_loss.json`.

torchtitan keeps one: a change to the model, the masking, the optimizer or the recipe that stalls
learning (or merely changes it) moves this number and fails CI, where a smoke test that only checks
"the loss went down" would pass. The data is Tiny Shakespeare from the package, tokenized by a
tokenizer trained on it (reproducible: the same ids on every machine), so the run is exactly
repeatable on CPU. To re-record after a deliberate change: `MICROBERT_RECORD_GOLDEN=1 pytest
tests/train/test_golden_loss.py`, and say why in the commit.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from train_helpers import REPO, history, run_train

GOLDEN = Path(__file__).with_name("golden_loss.json")


def _golden_run(train_env: dict[str, str], tmp_path: Path, device_env: dict[str, str]) -> dict:
    golden = json.loads(GOLDEN.read_text())
    text = tmp_path / "tinyshakespeare.txt"
    text.write_bytes(gzip.decompress((REPO / "microbert/corpus/tinyshakespeare.txt.gz").read_bytes()))
    run_dir = tmp_path / "run"
    out = run_train(
        {**train_env, **device_env},
        *golden["args"],
        "--dataset", str(text),
        "--run-dir", str(run_dir),
        "--resume", "never",
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    h = history(run_dir)
    return {
        "loss": h["train"][-1]["loss"],
        "eval_accuracy": h["eval"][-1]["accuracy"],
        "eval_baseline": h["eval"][-1]["baseline_accuracy"],
        "golden": golden,
    }


@pytest.mark.slow
def test_cpu_run_reaches_the_golden_loss(train_env, tmp_path):
    got = _golden_run(train_env, tmp_path, {"DS_ACCELERATOR": "cpu"})
    golden = got.pop("golden")
    if os.environ.get("MICROBERT_RECORD_GOLDEN"):
        golden["cpu"] = {k: round(v, 5) for k, v in got.items()}
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    want = golden["cpu"]
    assert got["loss"] == pytest.approx(want["loss"], abs=golden["tolerance"]["cpu"])
    assert got["eval_accuracy"] == pytest.approx(want["eval_accuracy"], abs=0.01)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_run_with_compile_and_cuda_graphs_reaches_the_golden_loss(train_env, tmp_path):
    """The GPU path (bf16, torch.compile, CUDA graphs, the fixed-slot head) against the CPU golden
    loss, with a bf16 tolerance: it must learn as the CPU path does."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {k: v for k, v in train_env.items() if k != "DS_ACCELERATOR"}
    got = _golden_run(env, tmp_path, {"MICROBERT_COMPILE": "reduce-overhead"})
    golden = got.pop("golden")
    assert got["loss"] == pytest.approx(golden["cpu"]["loss"], abs=golden["tolerance"]["gpu"])


@pytest.mark.slow
def test_cpu_profile_leaves_the_unigram_plateau(train_env, tmp_path):
    """The cpu profile's recipe on the embedded corpus, 800 steps (6.5 M tokens, about 3 minutes on
    2 cores): its model must predict better than always answering the most frequent token. With
    BERT's position init, this recipe stays at 1.0x the constant guess for 24 M tokens (bench/results/
    2026-12-01-tiny-sweep-h200.jsonl); the sinusoidal init reaches 1.59x here, and with the scaled
    residual init and unigram head bias (the defaults since session 6) 1.91x, so the bar of 1.75x
    fails if either of those regresses (measured on the 2-core development box). The schedule is
    warm-up-stable-decay so a short run keeps the profile's peak LR for most of its steps, and the
    profile's 450 s clock is lifted so that a loaded machine still runs all 800 steps."""
    run_dir = tmp_path / "run"
    out = run_train(
        {**train_env, "DS_ACCELERATOR": "cpu"},
        "--profile", "cpu", "--max-steps", "800", "--time-budget", "1h", "--schedule", "wsd",
        "--eval-every", "800", "--log-every", "400", "--checkpoint-every", "100000",
        "--run-dir", str(run_dir), "--resume", "never",
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    last = history(run_dir)["eval"][-1]
    assert last["accuracy"] >= 1.75 * last["baseline_accuracy"], last
