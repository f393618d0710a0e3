"""Several nodes on one host: two launchers with node ranks 0 and 1 on 127.0.0.1, one rank each (gloo).

The no-ssh form (`--num-nodes 2 --node-rank R --master-addr 127.0.0.1`) is what a scheduler runs on
each node; the hostfile form goes through pdsh and a real sshd on 127.0.0.1 started by the test.
Node-local disks are two folders: a node sees only its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import REPO, TINY, history, train_cmd

from microbert.cli import main as microbert_main
from microbert.errors import MicroBertError
from train import checkpointing
from train.launcher import free_port, launch_command, rank_argv
from train.main import main as train_main

COMMON = [*TINY, "--eval-every", "10"]


def _nodes_args(node_rank: int, port: int, num_nodes: int = 2) -> list[str]:
    return ["--num-nodes", str(num_nodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port)]  # fmt: skip


class Node:
    """One node's launcher: `python -m train ARGS`, its output in a file (a pipe could fill and block)."""

    def __init__(self, env: dict[str, str], args: list[str], log: Path):
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            train_cmd(*args), env=env, cwd=REPO, stdout=self.handle, stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.handle.close()

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def ranks(self) -> list[psutil.Process]:
        """The training processes under this launcher (DeepSpeed passes them --local_rank)."""
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in tree if any(a.startswith("--local_rank=") for a in p.cmdline())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            for proc in [*self.ranks(), psutil.Process(self.proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            self.proc.wait(timeout=30)
        self.handle.close()


def _two_nodes(env: dict[str, str], args: list[str], tmp: Path, env1: dict[str, str] | None = None):
    port = free_port()
    logs = tmp / f"logs-{port}"
    logs.mkdir()
    return [
        Node(env if rank == 0 else (env1 or env), [*args, *_nodes_args(rank, port)], logs / f"node{rank}.log")
        for rank in (0, 1)
    ]


def _finish(nodes: list[Node], timeout: float = 300) -> list[int]:
    try:
        return [node.wait(timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()


def _wait_for(predicate, timeout: float, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for node in nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"a node exited early ({node.proc.returncode}): {node.output()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting: " + nodes[0].output())
        time.sleep(0.2)


def _complete(run_dir: Path) -> list[int]:
    return [c.step for c in checkpointing.list_complete(run_dir / "checkpoints")]


def _saved(run_dir: Path, step: int):
    """A predicate: a complete checkpoint at `step` or later (older ones are pruned as the run goes)."""
    return lambda: max(_complete(run_dir), default=0) >= step


@pytest.fixture
def env(train_env) -> dict[str, str]:
    return {**train_env, "OMP_NUM_THREADS": "1", "MICROBERT_DIST_TIMEOUT_S": "60"}


# --- command line and launch commands (no processes) ---------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-rank", "0", "--num-nodes", "2"], "--master-addr is required with several nodes"),
        (["--node-rank", "2", "--num-nodes", "2", "--master-addr", "h"], "--node-rank 2 is not in 0 … 1"),
        (["--num-nodes", "2"], "this run spans 2 nodes: start it on every node with --node-rank R"),
        (["--hostfile", "/nonexistent/hosts"], "hostfile /nonexistent/hosts cannot be read"),
        (["--profile", "h200_2x8gpu"], "profile h200_2x8gpu spans 2 nodes"),
    ],
)
def test_launch_flag_mistakes_are_one_line_errors(args, message, capsys, tmp_path):
    assert train_main([*args, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_hostfile_with_a_node_rank_or_a_bad_line_is_refused(capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=8\nworker-1\n")
    assert train_main(["--hostfile", str(hostfile), "--node-rank", "0", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give one or the other" in err and "'worker-1' is not of the form 'HOST slots=N'" in err


def test_launch_commands_are_what_deepspeeds_runner_accepts():
    from deepspeed.launcher.runner import parse_args

    argv = [
        "--profile",
        "cpu",
        "--num-nodes",
        "2",
        "--node-rank=1",
        "--master-addr",
        "n0",
        "--max-steps",
        "5",
    ]
    assert rank_argv(argv) == ["--profile", "cpu", "--max-steps", "5"]
    from train.launcher import NodeLaunch

    no_ssh = launch_command(
        8, ["--profile", "cpu"], nodes=NodeLaunch(num_nodes=2, node_rank=1, master_addr="n0")
    )
    parsed = parse_args(no_ssh[3:])
    assert (parsed.no_ssh, parsed.node_rank, parsed.master_addr, parsed.master_port) == (True, 1, "n0", 29500)
    assert parsed.num_gpus == 8 and parsed.module and parsed.user_script == "train.main"
    pdsh = launch_command(8, ["--profile", "cpu"], nodes=NodeLaunch(hostfile="hosts", master_port=6000))
    parsed = parse_args(pdsh[3:])
    assert (parsed.hostfile, parsed.no_ssh, parsed.master_port) == ("hosts", False, 6000)
    assert parsed.user_args == ["--profile", "cpu"]


def test_configs_show_prints_the_command_for_each_node(capsys):
    assert microbert_main(["configs", "show", "h200_2x8gpu"]) == 0
    out = capsys.readouterr().out
    assert "profile h200_2x8gpu: 2x8 H200 141 GB, 16 processes, one per GPU, model bert-base" in out
    assert "microbert-train --profile h200_2x8gpu --hostfile HOSTFILE" in out
    for rank in (0, 1):
        assert f"node {rank}: microbert-train --profile h200_2x8gpu --num-nodes 2 --master-addr " in out
        assert f"--node-rank {rank}" in out
    assert microbert_main(["configs", "list", "--json"]) == 0
    profiles = {p["name"]: p for p in json.loads(capsys.readouterr().out)["profiles"]}
    assert (profiles["h200_2x8gpu"]["num_nodes"], profiles["h200_2x8gpu"]["num_gpus"]) == (2, 8)


def _info(world: int, micro: int = 8, accum: int = 1) -> checkpointing.CheckpointInfo:
    batch = {"micro_batch_size": micro, "grad_accum": accum, "train_batch_size": micro * accum * world,
             "requested": {"micro_batch_size": micro, "grad_accum": accum}}  # fmt: skip
    return checkpointing.CheckpointInfo(Path("step-4"), 4, world, batch)


def test_resume_on_another_node_count_keeps_the_global_batch_or_says_what_to_do():
    same = {"micro_batch_size": 8, "grad_accum": 1}
    assert checkpointing.batch_for_resume(_info(2), requested=same, micro_batch=8, world_size=2) == (1, None)
    accum, note = checkpointing.batch_for_resume(_info(16), requested=same, micro_batch=8, world_size=8)
    assert accum == 2 and "gradient accumulation 1 → 2 keeps the global batch of 128" in str(note)
    with pytest.raises(MicroBertError, match=r"pass --batch-size B --grad-accum A with B × A × 3 = 16"):
        checkpointing.batch_for_resume(_info(2), requested=same, micro_batch=8, world_size=3)
    chosen = {"micro_batch_size": 8, "grad_accum": 3}  # changed on purpose: followed, and said
    accum, note = checkpointing.batch_for_resume(_info(2), requested=chosen, micro_batch=8, world_size=1)
    assert accum == 3 and "changed from 16 to 24" in str(note)
    # an automatic micro-batch that comes out smaller on the new hardware: accumulation makes up
    auto = {"micro_batch_size": "auto", "grad_accum": 1}
    saved = _info(2, micro=64)
    saved.batch["requested"]["micro_batch_size"] = "auto"  # type: ignore[index]
    assert checkpointing.batch_for_resume(saved, requested=auto, micro_batch=32, world_size=2)[0] == 2


# --- two nodes on one host (slow: each node starts DeepSpeed's runner, its launcher and a rank) ----------
@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_ranks(tmp_path, env):
    """20 steps with checkpoints: two nodes of one rank give the very losses of one node with two.
    Node 1 has a cache of its own (a node-local disk): it prepares its copy, with rank 0's tokenizer."""
    args = [*COMMON, "--max-steps", "20", "--checkpoint-every", "10"]
    profile = json.loads((REPO / "train" / "profiles" / "cpu.json").read_text())
    two_ranks = tmp_path / "cpu_2ranks.json"
    two_ranks.write_text(json.dumps({**profile, "num_gpus": 2}))
    one = Node(
        env,
        ["--profile", str(two_ranks), *args[2:], "--run-dir", str(tmp_path / "one")],
        tmp_path / "one.log",
    )
    assert _finish([one]) == [0], one.output()
    cache1 = tmp_path / "node1-cache"
    nodes = _two_nodes(
        env,
        [*args, "--run-dir", str(tmp_path / "two")],
        tmp_path,
        {**env, "MICROBERT_CACHE_DIR": str(cache1)},
    )
    assert _finish(nodes) == [0, 0], nodes[0].output() + nodes[1].output()
    one_h, two_h = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["loss"] for r in two_h["train"]] == [r["loss"] for r in one_h["train"]]
    assert [r["step"] for r in two_h["train"]][-1] == 20
    assert [e["loss"] for e in two_h["eval"]] == [e["loss"] for e in one_h["eval"]]
    assert _complete(tmp_path / "two") == [10, 20]
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("finished at step 20/20") == 1 and "2 process(es)" in log  # written once, by rank 0
    assert "2 separate caches among 2 nodes" in log
    key = json.loads((tmp_path / "two" / "resolved_config.json").read_text())["runtime"]["dataset_cache_key"]
    entry0 = Path(env["MICROBERT_CACHE_DIR"]) / "datasets" / key
    (entry1,) = (cache1 / "datasets").iterdir()  # keyed by rank 0's tokenizer, which it was given
    for name in ("tokenizer.json", "train.bin", "eval.bin"):
        assert (entry1 / name).read_bytes() == (entry0 / name).read_bytes(), name
    assert (tmp_path / "two" / "export" / "latest").read_text().strip() == "step-20"


@pytest.mark.slow
def test_sigterm_to_node_1_then_kill_9_then_a_hang_then_resume_on_one_node(tmp_path, env):
    run_dir = tmp_path / "run"
    args = [*COMMON, "--max-steps", "5000", "--checkpoint-every", "4", "--run-dir", str(run_dir)]
    # 1. SIGTERM to node 1's launcher: both nodes stop at the same step, with one checkpoint, and exit 0
    nodes = _two_nodes(env, args, tmp_path)
    try:
        _wait_for(_saved(run_dir, 4), 240, nodes)
        nodes[1].proc.send_signal(signal.SIGTERM)
    finally:
        codes = _finish(nodes, timeout=180)
    assert codes == [0, 0], nodes[0].output() + nodes[1].output()
    status = json.loads((run_dir / "status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "stopped" and stopped >= 4
    assert (
        f"stopped at step {stopped} (signal SIGTERM on another rank)" in (run_dir / "train.log").read_text()
    )
    assert _complete(run_dir)[-1] == stopped
    folder = run_dir / "checkpoints" / f"step-{stopped}"
    assert {p.name for p in folder.glob("zero_pp_rank_*")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    # 2. the same command resumes; then node 1's rank is killed: node 0 fails within the timeout
    nodes = _two_nodes(env, args, tmp_path)
    try:
        _wait_for(_saved(run_dir, stopped + 4), 240, nodes)
        for proc in nodes[1].ranks():
            proc.kill()  # SIGKILL
        killed = time.monotonic()
        code0 = nodes[0].wait(timeout=float(env["MICROBERT_DIST_TIMEOUT_S"]) + 60)
        waited = time.monotonic() - killed
    finally:
        codes = _finish(nodes, timeout=60)
    assert code0 != 0 and codes[1] != 0
    out = nodes[0].output()
    assert "error: lost contact with another rank" in out and "the same command on every node resumes" in out
    assert waited < float(env["MICROBERT_DIST_TIMEOUT_S"]) + 30, f"node 0 took {waited:.0f} s to give up"
    assert f"resumed from step {stopped}" in (run_dir / "train.log").read_text()
    latest = _complete(run_dir)[-1]
    assert latest >= stopped + 4
    # 3. the same again, and node 1's rank hangs (SIGSTOP: what a host that vanished looks like, no
    #    socket closes): node 0 gives up after MICROBERT_DIST_TIMEOUT_S, in every group of the run
    hang_env = {**env, "MICROBERT_DIST_TIMEOUT_S": "25"}
    nodes = _two_nodes(hang_env, args, tmp_path)
    try:
        _wait_for(_saved(run_dir, latest + 4), 240, nodes)
        stopped_ranks = nodes[1].ranks()
        for proc in stopped_ranks:
            proc.suspend()
        hung = time.monotonic()
        code0 = nodes[0].wait(timeout=25 + 90)
        waited = time.monotonic() - hung
    finally:
        for proc in stopped_ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        codes = _finish(nodes, timeout=60)
    assert code0 != 0 and 20 <= waited < 25 + 30, f"node 0 gave up after {waited:.0f} s"
    assert "Timed out" in nodes[0].output() and "MICROBERT_DIST_TIMEOUT_S=25 s" in nodes[0].output()
    latest = _complete(run_dir)[-1]
    # 4. the run resumed on one node with one rank: the global batch of 16 is kept (8 × 2 × 1)
    one = Node(env, [*args, "--stop-at-step", str(latest + 2)], tmp_path / "one.log")
    assert _finish([one]) == [0], one.output()
    log = (run_dir / "train.log").read_text()
    assert "gradient accumulation 1 → 2 keeps the global batch of 16 sequences" in log
    assert f"resumed from step {latest}" in log
    h = history(run_dir)["train"]
    assert h[-1]["step"] == latest + 2
    before = next(r["tokens_seen"] for r in h if r["step"] == latest)
    assert 0.95 * 2 * 16 * 32 <= h[-1]["tokens_seen"] - before <= 2 * 16 * 32  # 16 sequences a step


@pytest.mark.slow
def test_node_local_run_folders_are_refused_at_start(tmp_path, env):
    """Each node writing into a folder the other does not see: a message at the start, no checkpoint."""
    port = free_port()
    args = [*COMMON, "--max-steps", "8", "--checkpoint-every", "4"]
    nodes = [
        Node(env, [*args, "--run-dir", str(tmp_path / f"disk{rank}" / "run"), *_nodes_args(rank, port)],
             tmp_path / f"node{rank}.log")
        for rank in (0, 1)
    ]  # fmt: skip
    codes = _finish(nodes, timeout=240)
    assert codes[0] != 0 and codes[1] != 0
    out = nodes[0].output()
    assert "error: run folder" in out and "is not shared by all 2 nodes" in out, out
    assert "put --run-dir on a shared filesystem" in out
    assert not (tmp_path / "disk0" / "run" / "checkpoints").exists()


# --- the hostfile form: pdsh over a real sshd on 127.0.0.1 ----------------------------------------------
def _sshd(tmp: Path) -> tuple[subprocess.Popen, Path]:
    """An sshd on a free port that accepts a fresh key, and an `ssh` on PATH that uses both."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("sshd needs root here")
    for tool in ("/usr/sbin/sshd", "pdsh", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            reasons.append(f"{tool} is not installed (apt-get install openssh-server pdsh)")
    if reasons:
        pytest.skip("; ".join(reasons))
    port = free_port()
    ssh_dir = tmp / "ssh"
    ssh_dir.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / name)], check=True)
    shutil.copy(ssh_dir / "user_key.pub", ssh_dir / "authorized_keys")
    config = ssh_dir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {ssh_dir / 'host_key'}\nPidFile {ssh_dir / 'pid'}\n"
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}\nPermitRootLogin yes\nStrictModes no\n"
        "UsePAM no\nPasswordAuthentication no\n"
        # The nodes' sessions get this PATH, as the nodes of a cluster built from one image do: with
        # sshd's own, DeepSpeed's CPU op was built by another `ninja` there than in every other
        # test, and each switch rebuilt it (~45 s; tests/conftest.py).
        f'SetEnv PATH="{os.environ.get("PATH", "")}"\n'
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    client = ssh_dir / "ssh_config"
    client.write_text(
        f"Host *\n  Port {port}\n  IdentityFile {ssh_dir / 'user_key'}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {client} "$@"\n')
    wrapper.chmod(0o755)
    deadline = time.monotonic() + 15
    while True:
        probe = subprocess.run([str(wrapper), "127.0.0.1", "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return sshd, bin_dir
        if sshd.poll() is not None or time.monotonic() > deadline:
            sshd.kill()
            pytest.skip(f"a local sshd could not be started: {probe.stderr.strip()[-300:]}")
        time.sleep(0.3)


@pytest.mark.slow
def test_hostfile_form_over_pdsh_and_ssh_trains_and_stops_on_sigterm(tmp_path, env):
    """`--hostfile` with two names of this host: pdsh starts a launcher on each over ssh; SIGTERM to
    ours stops both ranks at one step with one checkpoint (through the run folder's STOP file)."""
    sshd, bin_dir = _sshd(tmp_path)
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}"}
    args = [*COMMON, "--max-steps", "5000", "--checkpoint-every", "4", "--run-dir", str(run_dir)]
    args += ["--hostfile", str(hostfile), "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    node = Node(env, args, tmp_path / "pdsh.log")
    try:
        _wait_for(_saved(run_dir, 4), 240, [node])
        node.proc.send_signal(signal.SIGTERM)
        code = node.wait(timeout=180)
    finally:
        node.kill()
        sshd.terminate()
        sshd.wait(timeout=10)
    assert code == 0, node.output()
    status = json.loads((run_dir / "status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "stopped" and _complete(run_dir)[-1] == stopped
    assert f"stopped at step {stopped} (stop file {run_dir / 'STOP'})" in (run_dir / "train.log").read_text()
    assert not (run_dir / "STOP").exists()
    assert json.loads((run_dir / "resolved_config.json").read_text())["runtime"]["world_size"] == 2
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])
    ]
