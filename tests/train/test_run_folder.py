"""A run folder under abuse, through the real trainer (no mocks): kill -9 during the final export, two
trainers on one folder, a resume with another model or vocabulary or peak LR, a full disk, Ctrl-C
during setup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from filelock import FileLock
from train_helpers import REPO, TINY, history, run_train, train_cmd

from microbert.checkpoint import verify_artifact

pytestmark = pytest.mark.slow


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _refused(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """A one-line `error:` and exit 2, no traceback; returns the line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _log_has(run_dir: Path, text: str) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and text in log.read_text()


def test_kill_9_during_the_final_export_then_the_same_command_exports_it(tmp_path, train_env):
    run_dir = tmp_path / "run"
    args = [*TINY, "--max-steps", "30", "--checkpoint-every", "1000", "--eval-every", "1000"]
    args += ["--run-dir", str(run_dir)]
    proc = subprocess.Popen(train_cmd(*args), env=train_env, cwd=REPO, stderr=subprocess.DEVNULL)
    # The trainer writes `export/.latest.tmp-<pid>` once the step folder is complete: as a FIFO it
    # holds the process inside the final export (opening it blocks), where kill -9 finds it.
    _wait_for(lambda: _log_has(run_dir, "model bert-tiny"), 180, proc)
    (run_dir / "export").mkdir(exist_ok=True)
    os.mkfifo(run_dir / "export" / f".latest.tmp-{proc.pid}")
    _wait_for(lambda: (run_dir / "checkpoints" / "step-30" / "COMPLETE").is_file(), 180, proc)
    time.sleep(1.0)
    assert proc.poll() is None, "the trainer should be held in its final export"
    proc.kill()
    proc.wait(timeout=30)
    assert not (run_dir / "export" / "latest").exists()
    torn = run_dir / "export" / ".tmp-step-30-1"  # what a kill while writing the folder leaves
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half a file")

    result = run_train(train_env, *args)
    _ok(result)
    assert (run_dir / "export" / "latest").read_text().strip() == "step-30"
    assert verify_artifact(run_dir / "export" / "step-30")["step"] == 30
    assert not [p.name for p in (run_dir / "export").iterdir() if p.name.startswith(".")]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert "behind checkpoint step-30: exporting it" in (run_dir / "train.log").read_text()


def test_a_second_trainer_on_a_live_run_folder_is_refused_naming_the_first(tmp_path, train_env):
    run_dir = tmp_path / "run"
    args = [*TINY, "--max-steps", "5000", "--checkpoint-every", "1000", "--run-dir", str(run_dir)]
    first = subprocess.Popen(train_cmd(*args), env=train_env, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _log_has(run_dir, "step 2 loss"), 180, first)
        started = time.monotonic()
        second = run_train(train_env, *args, timeout=240)
        _refused(second, str(run_dir), "in use by another trainer", f"PID {first.pid}", socket.gethostname())
        assert (run_dir / "train.log").read_text().count("process(es) on cpu") == 1  # one writer
        assert time.monotonic() - started < 60  # told before DeepSpeed's start-up
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, train_env) -> tuple[Path, dict[str, str], list[str]]:
    """A run stopped at step 4 of 8, with its own data cache; copied by each test that resumes it."""
    base = tmp_path_factory.mktemp("stopped")
    env = {**train_env, "MICROBERT_CACHE_DIR": str(base / "cache")}
    args = [*TINY, "--max-steps", "8", "--checkpoint-every", "4", "--eval-every", "100", "--lr", "0.002"]
    _ok(run_train(env, *args, "--run-dir", str(base / "run"), "--stop-at-step", "4"))
    return base, env, args


def _copy(stopped_run, tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    base, env, args = stopped_run
    shutil.copytree(base, tmp_path / "copy", symlinks=True)
    env = {**env, "MICROBERT_CACHE_DIR": str(tmp_path / "copy" / "cache")}
    return tmp_path / "copy" / "run", env, args


def test_resume_with_another_model_shape_is_refused(stopped_run, tmp_path):
    run_dir, env, args = _copy(stopped_run, tmp_path)
    run_file = tmp_path / "heads.json"
    run_file.write_text(json.dumps({"model_overrides": {"num_attention_heads": 4}}))
    result = run_train(env, *args, "--run-dir", str(run_dir), "--config", str(run_file))
    _refused(result, "cannot resume", "num_attention_heads 2 -> 4", "--resume never")
    assert (run_dir / "export" / "latest").read_text().strip() == "step-4"  # nothing exported


def test_resume_with_another_vocabulary_is_refused(stopped_run, tmp_path):
    """The same command after the data was prepared again with other ids (as two machines did)."""
    run_dir, env, args = _copy(stopped_run, tmp_path)
    key = json.loads((run_dir / "resolved_config.json").read_text())["runtime"]["dataset_cache_key"]
    tokenizer_json = tmp_path / "copy" / "cache" / "datasets" / key / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    tokenizer_json.write_text(json.dumps(data))
    result = run_train(env, *args, "--run-dir", str(run_dir))
    _refused(result, "cannot resume", "tokenizer (vocabulary) hash")


def test_resume_with_a_new_peak_lr_applies_it_and_records_it(stopped_run, tmp_path):
    from train.engine import lr_lambda

    run_dir, env, args = _copy(stopped_run, tmp_path)
    _ok(run_train(env, *args, "--run-dir", str(run_dir), "--lr", "0.004"))
    resolved = json.loads((run_dir / "resolved_config.json").read_text())
    t = resolved["train"]
    assert t["lr"] == 0.004
    assert resolved["resumes"] == [{"step": 4, "changed": {"lr": [0.002, 0.004]}}]
    warmup = t["warmup_steps"] if t["warmup_steps"] is not None else max(1, int(0.06 * 8))
    for record in history(run_dir)["train"]:
        peak = 0.002 if record["step"] <= 4 else 0.004
        expected = peak * lr_lambda(
            record["step"], warmup=warmup, total=8, min_ratio=t["min_lr_ratio"], schedule=t["schedule"]
        )
        assert record["lr"] == pytest.approx(expected, rel=1e-9), record["step"]
    assert "applied from step 4 on: lr 0.002 -> 0.004" in (run_dir / "train.log").read_text()


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True
    )
    return result.returncode == 0


def _train_on_a_small_disk(env, args: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """The trainer with `folder` on a 256 KiB tmpfs of its own (a user and mount namespace)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(folder), *train_cmd(*args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_full_disk_at_a_checkpoint_or_an_export_is_one_line_then_resumes(tmp_path, train_env):
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    run_dir = tmp_path / "run"
    args = [*TINY, "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "100"]
    args += ["--run-dir", str(run_dir)]
    result = _train_on_a_small_disk(train_env, args, run_dir / "checkpoints")
    _refused(result, "the disk is full", f"writing {run_dir / 'checkpoints' / 'step-2'} needs about", "MiB")

    result = _train_on_a_small_disk(train_env, args, run_dir / "export")
    _refused(result, "the disk is full", f"writing {run_dir / 'export' / 'step-2'} needs about", "MiB")
    # space again (the tmpfs is gone with its namespace): the same command resumes and exports
    _ok(run_train(train_env, *args))
    assert (run_dir / "export" / "latest").read_text().strip() == "step-4"


def test_ctrl_c_during_setup_is_a_clean_message_and_exit_130(tmp_path, train_env):
    """The trainer is held in its setup, however fast the machine: it waits for the data-preparation
    lock, which this test holds (its name comes from a first run on another cache), instead of the
    test racing a cold preparation of 2-3 s."""
    args = ["--profile", "cpu", "--max-steps", "2"]
    _ok(
        run_train(
            {**train_env, "MICROBERT_CACHE_DIR": str(tmp_path / "first")},
            *args,
            "--run-dir",
            str(tmp_path / "first-run"),
        )
    )
    (key_lock,) = (tmp_path / "first" / "locks").glob("*.lock")
    locks = tmp_path / "cache" / "locks"
    locks.mkdir(parents=True)
    held = FileLock(str(locks / key_lock.name))
    held.acquire(timeout=0)
    env = {**train_env, "MICROBERT_CACHE_DIR": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    # SIGINT as a terminal leaves it: a test run started in the background (`cmd &` in a script)
    # inherits it ignored, and so would the trainer, which then rightly ignores Ctrl-C.
    proc = subprocess.Popen(
        train_cmd(*args, "--run-dir", str(run_dir)), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        # past this line the trainer is in its setup, and it cannot leave it while the lock is held
        _wait_for(lambda: _log_has(run_dir, "process(es) on cpu"), 180, proc)
        time.sleep(1.0)  # (the cold preparation took 2-3 s; held, it has not got anywhere)
        assert proc.poll() is None and not _log_has(run_dir, "data embedded")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, stderr = proc.communicate(timeout=120)
    finally:
        held.release()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "error: interrupted (Ctrl-C) while setting up" in stderr
    assert not (run_dir / "checkpoints").exists()
