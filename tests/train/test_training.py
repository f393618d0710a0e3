"""End-to-end trainer runs on CPU through DeepSpeed (no mocks): exact resume, signals, crash safety,
outputs, and the two-rank launcher path. Tiny settings keep every run to seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, TINY, history, run_train, train_cmd

from microbert.cli import main as microbert_main
from microbert.predict import FillMaskPredictor

pytestmark = pytest.mark.slow

# the run file turns dropout back on (the cpu profile has none), so exact resume covers its RNG too
DROPOUT_RUN_FILE = str(REPO / "tests" / "train" / "dropout_run.json")
STEPS_24 = [
    *TINY,
    "--config",
    DROPOUT_RUN_FILE,
    "--max-steps",
    "24",
    "--checkpoint-every",
    "8",
    "--eval-every",
    "8",
]


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, train_env) -> Path:
    """An uninterrupted 24-step run: the reference for resume, and the subject of the output checks."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    _ok(run_train(train_env, *STEPS_24, "--run-dir", str(run_dir)))
    return run_dir


def test_stopped_at_16_and_resumed_to_24_matches_uninterrupted_bit_for_bit(full_run, tmp_path, train_env):
    run_dir = tmp_path / "run"
    first = run_train(train_env, *STEPS_24, "--run-dir", str(run_dir), "--stop-at-step", "16")
    _ok(first)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert history(run_dir)["train"][-1]["step"] == 16
    second = run_train(train_env, *STEPS_24, "--run-dir", str(run_dir))
    _ok(second)
    assert "resumed from step 16" in (run_dir / "train.log").read_text()
    reference, resumed = history(full_run), history(run_dir)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in reference["train"]]
    assert resumed["train"][-1]["step"] == 24
    assert resumed["eval"][-1]["loss"] == reference["eval"][-1]["loss"]
    assert resumed["train"][-1]["tokens_seen"] == reference["train"][-1]["tokens_seen"]


def test_run_folder_outputs(full_run, capsys):
    log = (full_run / "train.log").read_text()
    assert "=== Testing MLM Model ===" in log and "Input: " in log
    assert "MFLOP per token (6N + 12·L·d·S)" in log and "peak memory" in log
    resolved = json.loads((full_run / "resolved_config.json").read_text())
    assert resolved["train"]["max_steps"] == 24 and resolved["runtime"]["world_size"] == 1
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 1
    assert resolved["model"]["hidden_dropout_prob"] == 0.1  # the run file's layer
    plan = resolved["plan"]  # the run plan, as the engine was built from it
    assert (plan["batch"]["train_batch_size"], plan["schedule"]["total_steps"]) == (8, 24)
    assert resolved["deepspeed"]["train_batch_size"] == 8 and plan["resolved_at_launch"] == []
    h = history(full_run)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu", "data_wait_share"} <= set(
        h["train"][0]
    )
    assert {"loss", "accuracy", "perplexity", "baseline_accuracy"} <= set(h["eval"][-1])
    assert [e["step"] for e in h["eval"]] == [8, 16, 24]
    assert (full_run / "training_history.png").stat().st_size > 10_000
    # checkpoints every 8 steps, the newest 3 kept, each with its export; latest names the newest
    assert sorted(p.name for p in (full_run / "checkpoints").glob("step-*")) == [
        "step-16",
        "step-24",
        "step-8",
    ]
    assert (full_run / "export" / "latest").read_text().strip() == "step-24"
    predictor = FillMaskPredictor.from_pretrained(full_run)
    assert len(predictor.predict(["the [MASK] of the king ."], top_k=3)[0]) == 3
    assert microbert_main(["eval", "--model-dir", str(full_run), "--dataset", "embedded", "--json",
                           "--max-samples", "300", "--max-batches", "2"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 24 and report["seq_len"] == 32 and 0 <= report["accuracy"] <= 1
    assert report["perplexity"] > 1 and report["num_masked"] > 0


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _logged_step(run_dir: Path, step: int) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and f"step {step} loss" in log.read_text()


def test_sigterm_checkpoints_current_step_and_exits_0(tmp_path, train_env):
    run_dir = tmp_path / "run"
    args = [*TINY, "--max-steps", "5000", "--checkpoint-every", "1000", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(train_cmd(*args), env=train_env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _logged_step(run_dir, 3), 120, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    step = status["step"]
    assert status["state"] == "stopped" and 3 <= step < 1000
    assert (run_dir / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert (run_dir / "export" / "latest").read_text().strip() == f"step-{step}"
    assert f"stopped at step {step} (signal SIGTERM)" in (run_dir / "train.log").read_text()


def test_kill_9_then_same_command_resumes_from_latest_complete_checkpoint(tmp_path, train_env):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "--max-steps",
        "16",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "100",
        "--run-dir",
        str(run_dir),
    ]
    proc = subprocess.Popen(train_cmd(*args), env=train_env, cwd=REPO, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (run_dir / "checkpoints" / "step-8" / "COMPLETE").is_file(), 120, proc)
    proc.kill()  # SIGKILL: no handler runs, possibly mid-checkpoint
    proc.wait(timeout=30)
    # debris of a checkpoint that was being written when the process died: never resumed from
    torn = run_dir / "checkpoints" / "step-1000"
    torn.mkdir(parents=True)
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    result = run_train(train_env, *args)
    _ok(result)
    log = (run_dir / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and "step-1000" not in resumed[0]
    assert int(resumed[0].split("resumed from step ")[1].split()[0]) >= 8
    status = json.loads((run_dir / "status.json").read_text())
    assert status == {**status, "state": "finished", "step": 16}
    assert not torn.exists()  # pruned as crash debris at the next save


def test_out_of_memory_is_reported_with_the_flag_to_lower(tmp_path, train_env):
    """A step that runs out of memory ends with an `error:` naming --batch-size, not a traceback."""
    script = (
        "import sys, torch\n"
        "from microbert.model import BertForMaskedLM\n"
        "def forward(self, *a, **k):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
        "BertForMaskedLM.forward = forward\n"
        "from train.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [*TINY, "--max-steps", "4", "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=train_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "error: out of GPU memory at micro-batch 8" in result.stderr and "lower --batch-size" in result.stderr
    )


def test_two_ranks_through_the_launcher_train_checkpoint_stop_on_sigterm_then_resume_on_one(
    tmp_path, train_env
):
    """The multi-GPU path on CPU: a profile naming 2 GPUs makes `python -m train` start
    `deepspeed --num_gpus 2`; SIGTERM to it reaches both ranks, which checkpoint together and exit 0."""
    profile = json.loads((REPO / "train" / "profiles" / "cpu.json").read_text())
    profile_path = tmp_path / "cpu_2ranks.json"
    profile_path.write_text(json.dumps({**profile, "num_gpus": 2}))
    run_dir = tmp_path / "run"
    common = [*TINY[2:], "--checkpoint-every", "4", "--eval-every", "4", "--run-dir", str(run_dir)]
    env = {**train_env, "OMP_NUM_THREADS": "1"}
    args = ["--profile", str(profile_path), *common, "--max-steps", "5000"]
    proc = subprocess.Popen(train_cmd(*args), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run_dir / "checkpoints" / "step-4" / "COMPLETE").is_file(), 180, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "launching 2 ranks" in stderr and "deepspeed.launcher.runner --num_gpus 2" in stderr
    leftover = subprocess.run(["pgrep", "-f", f"--run-dir {run_dir}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "a rank outlived the launcher"
    step = json.loads((run_dir / "status.json").read_text())["step"]
    assert step >= 4 and f"stopped at step {step} (signal SIGTERM)" in (run_dir / "train.log").read_text()
    folder = run_dir / "checkpoints" / f"step-{step}"
    marker = json.loads((folder / "COMPLETE").read_text())
    assert (marker["step"], marker["world_size"], marker["batch"]["train_batch_size"]) == (step, 2, 16)
    assert {p.name for p in folder.glob("zero_pp_rank_*")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert (folder / "rank-0.pt").is_file() and (folder / "rank-1.pt").is_file()
    assert json.loads((run_dir / "resolved_config.json").read_text())["runtime"]["world_size"] == 2
    # 2 ranks × 8 sequences × 32 tokens per step, none of them padding in the packed corpus
    assert history(run_dir)["train"][-1]["tokens_seen"] == step * 2 * 8 * 32
    # the same run continued on one process: weights and schedule carry over, the optimizer restarts
    result = run_train(train_env, "--profile", "cpu", *common, "--max-steps", str(step + 2))
    _ok(result)
    log = (run_dir / "train.log").read_text()
    assert "written by 2 rank(s), this run has 1" in log and f"resumed from step {step}" in log
    assert json.loads((run_dir / "status.json").read_text()) == {
        **json.loads((run_dir / "status.json").read_text()),
        "state": "finished",
        "step": step + 2,
    }
