"""Start DeepSpeed's launcher for a run of several processes, and make sure no rank outlives us.

Three forms, all through `deepspeed.launcher.runner` (its own flag names, dashes or underscores):

- one node, several GPUs: `--num_gpus N` (a profile naming N GPUs);
- several nodes, started from one: `--hostfile FILE`, which starts every node's ranks over pdsh
  and ssh (passwordless ssh to every host, the same paths everywhere);
- several nodes, each started by a scheduler (SLURM, Kubernetes): on every node the same command
  with `--num-nodes N --node-rank R --master-addr HOST [--master-port PORT]`, DeepSpeed's `--no_ssh`
  form. DeepSpeed needs a hostfile for it too; one naming N nodes is written for it.

Stopping. The DeepSpeed runner does not forward signals on a node, and its per-node launcher kills
the ranks 30 s after a signal, possibly in the middle of a checkpoint. So the signal goes to the
ranks of this node alone: each checkpoints the current step and exits 0, and the stop is agreed
over all nodes at the same step (train/loop.py). With `--hostfile` the ranks are not this process's
children (pdsh started them): a signal writes `<run>/STOP` instead, which rank 0 reads within a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 120.0  # time the ranks get to finish a checkpoint after a stop signal
STOP_FILE = "STOP"  # in the run folder: rank 0 stops the run at the next step when it appears
DEFAULT_MASTER_PORT = 29500  # DeepSpeed's and torch's default; every node must be given the same
# Environment the ranks need that DeepSpeed's pdsh launch does not pass on by itself (it passes
# PYTHON*, NCCL*, UCX* … ): the trainer's settings, the accelerator choice and offline switches.
FORWARDED_ENV = ("MICROBERT_", "DS_ACCELERATOR", "HF_", "TOKENIZERS_", "TORCH_", "OMP_NUM_THREADS")
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass
class NodeLaunch:
    """How the ranks span nodes: a hostfile (pdsh/ssh) or this node's place among N (no ssh)."""

    hostfile: str | None = None
    num_nodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def multi_node(self) -> bool:
        return self.hostfile is not None or (self.num_nodes or 1) > 1 or self.node_rank is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_problems(nodes: NodeLaunch, profile_nodes: int, profile: str | None) -> list[str]:
    """What is wrong with the launch flags, in words that say what to do (empty: nothing)."""
    problems = []
    n = nodes.num_nodes
    if nodes.hostfile is not None:
        if nodes.node_rank is not None:
            problems.append(
                "--hostfile starts every node from here over ssh, --node-rank is for starting each node "
                "yourself: give one or the other"
            )
        problems.extend(_hostfile_problems(Path(nodes.hostfile)))
        if shutil.which("pdsh") is None:
            problems.append(
                "--hostfile starts the other nodes through pdsh, which is not installed here: install it "
                "(apt-get install pdsh), or start each node yourself with --num-nodes N --node-rank R "
                "--master-addr HOST"
            )
        return problems
    if n is not None and n < 1:
        problems.append(f"--num-nodes must be at least 1, got {n}")
        return problems
    total = n or profile_nodes
    if nodes.node_rank is None:
        if total > 1:
            what = f"profile {profile}" if profile and not n else "this run"
            problems.append(
                f"{what} spans {total} nodes: start it on every node with --node-rank R (0 … {total - 1}) "
                "--master-addr HOST-OF-NODE-0, or on one with --hostfile FILE (see `microbert configs show`)"
            )
        return problems
    if not 0 <= nodes.node_rank < total:
        problems.append(f"--node-rank {nodes.node_rank} is not in 0 … {total - 1} (--num-nodes {total})")
    if total > 1 and not nodes.master_addr:
        problems.append("--master-addr is required with several nodes: node 0's address as the others see it")
    if nodes.master_port is not None and not 0 < nodes.master_port < 65536:
        problems.append(f"--master-port {nodes.master_port} is not a TCP port")
    return problems


def _hostfile_problems(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        return [f"hostfile {path} cannot be read: {exc.strerror or exc}"]
    hosts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    bad = [line for line in hosts if not _HOST_LINE.match(line)]
    if bad:
        return [f"hostfile {path}: {bad[0]!r} is not of the form 'HOST slots=N'"]
    if not hosts:
        return [f"hostfile {path} names no host: write one 'HOST slots=N' line per node"]
    return []


def rank_argv(argv: Sequence[str]) -> list[str]:
    """The command line without the launch flags: the ranks are already placed."""
    flags = {"--hostfile", "--num-nodes", "--num_nodes", "--node-rank", "--node_rank"}
    flags |= {"--master-addr", "--master_addr", "--master-port", "--master_port"}
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def launch_command(
    num_gpus: int,
    argv: Sequence[str],
    master_port: int | None = None,
    nodes: NodeLaunch | None = None,
    node_hostfile: str = "NODES.txt",
) -> list[str]:
    """The command that starts `num_gpus` ranks per node, each `python -m train.main ARGV --local_rank=R`.

    node_hostfile: for the no-ssh form, the file naming the nodes (see `_node_hostfile`).
    """
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    nodes = nodes or NodeLaunch()
    if nodes.hostfile is not None:
        runner += ["--hostfile", nodes.hostfile]
        if nodes.num_nodes is not None:
            runner += ["--num_nodes", str(nodes.num_nodes)]
        if nodes.master_addr:
            runner += ["--master_addr", nodes.master_addr]
        port = nodes.master_port or DEFAULT_MASTER_PORT
    elif nodes.node_rank is not None:
        runner += ["--hostfile", node_hostfile, "--no_ssh", "--node_rank", str(nodes.node_rank)]
        runner += ["--master_addr", str(nodes.master_addr)]
        port = nodes.master_port or DEFAULT_MASTER_PORT
    else:
        port = master_port or free_port()
    return [*runner, "--num_gpus", str(num_gpus), "--master_port", str(port), "--module", "train.main", *argv]


def _node_hostfile(num_nodes: int, num_gpus: int) -> str:
    """DeepSpeed's --no_ssh form takes the node list from a hostfile; the names are never dialled."""
    handle, path = tempfile.mkstemp(prefix="microbert-nodes-", suffix=".txt")
    with os.fdopen(handle, "w") as f:
        f.writelines(f"node-{i} slots={num_gpus}\n" for i in range(num_nodes))
    return path


def _env_file(env: dict[str, str]) -> str:
    """A DeepSpeed environment file (DS_ENV_FILE) passing the trainer's settings to every node.

    It replaces the `.deepspeed_env` files DeepSpeed would read (home, then the current folder), so
    their lines come first.
    """
    lines: list[str] = []
    for folder in (Path.home(), Path(".")):
        own = folder / env.get("DS_ENV_FILE", ".deepspeed_env")
        if own.is_file():
            lines += [line for line in own.read_text().splitlines() if "=" in line]
    for key, value in sorted(env.items()):
        if key.startswith(FORWARDED_ENV) and "\n" not in value and '"' not in value:
            lines.append(f"{key}={value}")
    handle, path = tempfile.mkstemp(prefix="microbert-env-", suffix=".txt")
    with os.fdopen(handle, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
    return path


def _rank_processes(runner_pid: int) -> list[int]:
    """This node's ranks: the children of DeepSpeed's per-node launcher under our runner."""
    import psutil

    try:
        tree = psutil.Process(runner_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if "deepspeed.launcher.launch" in " ".join(proc.cmdline()):
                ranks += [child.pid for child in proc.children()]
    return ranks


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(num_gpus: int, argv: Sequence[str], run_dir: str, nodes: NodeLaunch | None = None) -> int:
    """Run the ranks to completion; returns 0 for a finished or cleanly stopped run."""
    nodes = nodes or NodeLaunch()
    env = dict(os.environ)
    temporary: list[str] = []
    node_hostfile = "NODES.txt"
    if nodes.node_rank is not None:
        node_hostfile = _node_hostfile(nodes.num_nodes or 1, num_gpus)
        temporary.append(node_hostfile)
    command = launch_command(num_gpus, rank_argv(argv), nodes=nodes, node_hostfile=node_hostfile)
    stop_file = Path(run_dir) / STOP_FILE
    if nodes.hostfile is not None:
        env["DS_ENV_FILE"] = _env_file(env)
        temporary.append(env["DS_ENV_FILE"])
        stop_file.unlink(missing_ok=True)  # a stale request must not stop the run at its first step
    where = f" on node {nodes.node_rank} of {nodes.num_nodes}" if nodes.node_rank is not None else ""
    print(f"launching {num_gpus} ranks{where}: {' '.join(command)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command, start_new_session=True, env=env)
    pgid = child.pid
    forwarded: list[int] = []
    teardown_at: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        if nodes.hostfile is not None:
            if len(forwarded) == 1:
                with contextlib.suppress(OSError):
                    stop_file.write_text(f"{signal.Signals(signum).name}\n")
                teardown_at.append(time.monotonic() + GRACE_S)
            else:  # asked twice: DeepSpeed's own teardown (pkill on every host)
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
            return
        ranks = _rank_processes(child.pid)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks:  # not started yet: nothing to checkpoint
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if teardown_at and time.monotonic() > teardown_at[0]:
                    print("launcher: the ranks did not stop in time; tearing them down", file=sys.stderr)
                    teardown_at.clear()
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (GRACE_S if forwarded else 5.0)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            print("launcher: ranks still alive after the runner exited; killing them", file=sys.stderr)
            os.killpg(pgid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for path in temporary:
            with contextlib.suppress(OSError):
                os.unlink(path)
    if forwarded and code != 0:
        status = Path(run_dir) / "status.json"
        try:
            state = json.loads(status.read_text()).get("state")
        except (OSError, ValueError):
            state = None
        if state in ("stopped", "finished"):
            return 0
    return code if code >= 0 else 128 - code
