"""What changes when the ranks span several machines: which of them share a folder, who prepares data.

A node is told apart by the launcher's node rank (DeepSpeed sets `CROSS_RANK`, torchrun
`GROUP_RANK`), else by host name; its first rank is the node's leader. Whether two nodes share a
folder is not guessed from paths or mount tables: every leader writes a probe file with a fresh
nonce into its own copy of the folder, and every leader looks for the others' files in its copy.

- The run folder (DeepSpeed's sharded checkpoint, the export, the status) must be one folder that
  every node sees: on node-local disks the run stops at its start with a message, not with a
  checkpoint that is missing half its optimizer partitions at step 2,000.
- The data cache may be shared or node-local. Each group of nodes that shares a cache has one
  preparer (its lowest rank); rank 0 goes first, the preparers of other caches tokenize with rank
  0's tokenizer, and everyone else reads what they wrote: an entry never has two writers, whether
  or not the filesystem's locks work across hosts, and every node reads the same token ids.

All collectives here run over a CPU (gloo) group; the wait for data preparation has its own group
with a long timeout, since preparing a large dataset can take longer than any training collective.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from tokenizers import Tokenizer

from microbert.data import PreparedDataset
from microbert.errors import MicroBertError

TIMEOUT_ENV = "MICROBERT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600  # NCCL's own default: a node that died or hangs ends the run within 10 min
DATA_WAIT_S = 48 * 3600  # ranks wait this long for another rank to prepare the data
PROBE_PREFIX = ".microbert-probe-"


def dist_timeout() -> timedelta:
    """`MICROBERT_DIST_TIMEOUT_S`: how long a collective may wait for a peer before the run fails.

    It bounds how long the surviving ranks hang when a node dies (a process killed on a live host is
    noticed at once, through its closed sockets; a host that vanishes is noticed after this long).
    It must exceed the longest pause of any one rank between collectives (an evaluation, an export).
    """
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MicroBertError(f"{TIMEOUT_ENV}={value!r}: give the collective timeout in seconds (> 0)")
    return timedelta(seconds=seconds)


def group_timeout() -> timedelta:
    """The collective timeout, made the default of every process group created from now on too.

    torch gives a group made by `new_group` without a timeout its own default (30 min for gloo,
    10 for NCCL), not the one `init_process_group` was given; DeepSpeed makes its data-parallel
    group that way (a clone of the world group, used for the gradient reduction). So the default is
    set here, before any group exists, for the bound to hold for every collective of the run.
    """
    timeout = dist_timeout()
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    return timeout


def node_key() -> str:
    """What tells this process's node from the others: the launcher's node rank, else the host name."""
    for name in ("CROSS_RANK", "GROUP_RANK"):
        if os.environ.get(name, "").isdigit():
            return f"node-{int(os.environ[name])}"
    return f"host-{socket.gethostname()}"


@dataclass
class Nodes:
    """The ranks grouped by node: this rank's node, each node's leader (first rank) and host name."""

    rank: int
    world_size: int
    node: int
    leaders: list[int]
    hosts: list[str]
    group: Any = None  # the CPU group the collectives here use; None in a one-process world
    _wait_group: Any = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.leaders)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leaders[self.node]

    def describe(self, node: int) -> str:
        return f"node {node} ({self.hosts[node]}, rank {self.leaders[node]})"

    # --- collectives over the CPU group ----------------------------------------------------------
    def _gather(self, value: Any) -> list[Any]:
        if self.group is None:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    # --- shared folders -----------------------------------------------------------------------------
    def sharing(self, folder: Path) -> list[list[int]]:
        """For every node, the nodes whose probe file it finds in its own `folder` (itself included)."""
        if self.num_nodes == 1:
            return [[0]]
        nonce = self._gather(uuid.uuid4().hex if self.rank == 0 else None)[0]
        probe_dir = folder / f"{PROBE_PREFIX}{nonce}"
        mine = probe_dir / f"node-{self.node}"
        error = None
        if self.is_leader:
            try:
                probe_dir.mkdir(parents=True, exist_ok=True)
                with mine.open("w") as handle:
                    handle.write(f"{nonce} {self.node}\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                error = f"{self.describe(self.node)} cannot write {probe_dir}: {exc.strerror or exc}"
        errors = [e for e in self._gather(error) if e]
        if errors:
            raise MicroBertError("; ".join(errors))
        seen = None
        if self.is_leader:
            seen = [n for n in range(self.num_nodes) if _reads(probe_dir / f"node-{n}", f"{nonce} {n}")]
        views = self._gather(seen)
        if self.is_leader:
            mine.unlink(missing_ok=True)
        self._barrier()
        if self.is_leader:
            with contextlib.suppress(OSError):  # another node sharing the folder removed it first
                probe_dir.rmdir()
        return [views[leader] for leader in self.leaders]

    def require_shared(self, folder: Path, what: str, advice: str) -> None:
        """Stop every rank with one message unless all nodes see the same `folder`."""
        views = self.sharing(folder)
        apart = [n for n in range(self.num_nodes) if sorted(views[n]) != list(range(self.num_nodes))]
        if apart:
            names = ", ".join(self.describe(n) for n in apart)
            raise MicroBertError(
                f"{what} {folder} is not shared by all {self.num_nodes} nodes: {names} do not see the "
                f"files the other nodes write there. {advice}"
            )

    # --- data preparation ---------------------------------------------------------------------------
    def prepare_once(
        self,
        cache_dir: Path,
        prepare: Callable[[Tokenizer | None], PreparedDataset],
        log: Callable[[str], None],
    ) -> PreparedDataset:
        """Prepare the data on one rank per cache first, then open it on all the others.

        `prepare(tokenizer)` is `prepare_dataset`, with a given tokenizer or None (train one). Rank 0
        goes first. A tokenizer trained on the source is not the same from one process to the next
        (the trainer breaks ties among equal counts in no fixed order), so the preparers of other
        caches (node-local disks) tokenize with rank 0's tokenizer rather than train their own:
        every node then reads the very same token ids. Their entries are keyed by that tokenizer.
        If a preparer fails, every rank stops: the preparer with its own error, the others saying so.
        """
        if self.group is None:
            return prepare(None)
        owners = [min(view) for view in self.sharing(cache_dir)]  # [0] on one node, without probing
        caches = sorted(set(owners))
        if self.rank == 0 and self.num_nodes > 1:
            if len(caches) == 1:
                log(f"data cache {cache_dir} is shared by all {self.num_nodes} nodes: rank 0 prepares it")
            else:
                log(
                    f"data cache: {len(caches)} separate caches among {self.num_nodes} nodes; rank 0 "
                    f"prepares its own, then the first rank of node(s) {', '.join(map(str, caches[1:]))} "
                    "tokenizes the same data with rank 0's tokenizer"
                )
        data, tokenizer_json = self._round(prepare, None, self.rank == 0, share=len(caches) > 1)
        tokenizer = None
        if len(caches) > 1:  # a second round, every rank in it: the other caches' preparers
            owner = owners[self.node]
            tokenizer = Tokenizer.from_str(tokenizer_json) if owner != 0 and tokenizer_json else None
            second, _ = self._round(prepare, tokenizer, owner != 0 and self.rank == self.leaders[owner])
            data = data or second
        return data or prepare(tokenizer)

    def _round(
        self,
        prepare: Callable[[Tokenizer | None], PreparedDataset],
        tokenizer: Tokenizer | None,
        mine: bool,
        share: bool = False,
    ) -> tuple[PreparedDataset | None, str | None]:
        """The ranks for which `mine` holds prepare, the others wait for them (as long as it takes).

        Returns this rank's data (None if it did not prepare) and, with `share`, the tokenizer of the
        rank that prepared.
        """
        data, failure = None, None
        if mine:
            try:
                data = prepare(tokenizer)
            except BaseException as exc:
                self._outcomes(None, f"rank {self.rank} ({type(exc).__name__}: {exc})")
                raise
        outcomes = self._outcomes(data.tokenizer.to_str() if share and data else None, failure)
        failures = [f for _, f in outcomes if f]
        if failures:
            raise MicroBertError(f"data preparation failed on {failures[0]}; see that rank's error")
        return data, next((p for p, _ in outcomes if p is not None), None)

    def _outcomes(self, payload: Any, failure: str | None) -> list[tuple[Any, str | None]]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, (payload, failure), group=self._wait_group)
        return out


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank went away (died, was killed, timed out)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out")
    )


class PeerLost(MicroBertError):
    """Another rank is gone: what happened, and how the run carries on."""

    exit_code = 1

    def __init__(self, exc: BaseException, checkpoint_dir: Path):
        from train.checkpointing import latest_complete

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        latest = latest_complete(checkpoint_dir)
        where = f"step {latest.step} ({latest.path})" if latest else "none yet"
        super().__init__(
            f"lost contact with another rank: {first[:300]}. A node died, was stopped, or could not be "
            f"reached within {TIMEOUT_ENV}={int(dist_timeout().total_seconds())} s. The last complete "
            f"checkpoint is {where}: the same command on every node resumes from it"
        )


def _reads(path: Path, expected: str) -> bool:
    try:
        return path.read_text().strip() == expected
    except OSError:
        return False


def discover(rank: int, world_size: int) -> Nodes:
    """Group the ranks by node (a collective: every rank calls it, in the same order)."""
    if world_size == 1:
        return Nodes(rank=0, world_size=1, node=0, leaders=[0], hosts=[socket.gethostname()])
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    # the wait group is created here, in the same order on every rank (group creation is collective)
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=DATA_WAIT_S))
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, (node_key(), socket.gethostname()), group=group)
    leaders: dict[str, int] = {}
    hosts: dict[str, str] = {}
    for r, (key, host) in enumerate(out):
        leaders.setdefault(key, r)
        hosts.setdefault(key, host)
    keys = list(leaders)  # in order of first rank: node 0 holds rank 0
    return Nodes(
        rank=rank,
        world_size=world_size,
        node=keys.index(out[rank][0]),
        leaders=[leaders[k] for k in keys],
        hosts=[hosts[k] for k in keys],
        group=group,
        _wait_group=wait_group,
    )
