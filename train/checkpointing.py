"""Checkpoints that can always be resumed from, and only when they are whole.

Layout, under `<run>/checkpoints/`:
```
step-<N>/   DeepSpeed files (model states with the shared client state, per-rank optimizer partitions)
            rank-<r>.pt     this rank's loader position and RNG states
            run.json        what the weights are bound to (model shape, tokenizer and data hashes,
                            sequence length, seed) and the settings they were trained with
            COMPLETE        written by rank 0 after every rank finished writing (JSON: step, world size)
```
A folder without `COMPLETE` is a checkpoint that was being written when the process died: it is
never resumed from and is removed at the next save. On resume, `run.json` is compared with the new
run before anything is loaded: a change in what the weights are bound to stops the run with a
message that names it (2-head weights must not continue as a 4-head model, nor ids of one
vocabulary under another); a changed setting (peak LR, schedule, steps, batch) is applied from the
resumed step on and said in the log. RNG states are plain tensors and lists, so
`torch.load(weights_only=True)` reads them: nothing is unpickled beyond what DeepSpeed itself loads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from microbert.checkpoint import disk_full_error
from microbert.data.cache import folder_bytes
from microbert.errors import MicroBertError
from train.nodes import Nodes

COMPLETE = "COMPLETE"
RUN_RECORD = "run.json"
# settings that say nothing about the weights or the order they were trained in
_NOT_COMPARED = ("run_dir", "resume", "stop_at_step", "probe_texts", "log_every")
_NOT_SHAPE = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and accelerator RNG states in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    batch: dict[str, Any] | None = None  # the batch geometry that wrote it (see `batch_for_resume`)

    def record(self) -> dict[str, Any] | None:
        """The checkpoint's `run.json` (None for a checkpoint written before it existed)."""
        try:
            data = json.loads((self.path / RUN_RECORD).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def model_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The model config without what training may change (dropout) or no longer uses (init range)."""
    return {k: v for k, v in config.items() if k not in _NOT_SHAPE}


def bound_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What the weights are bound to and differs now, in words ("model num_attention_heads 2 -> 4")."""
    changes = []
    old_model, new_model = saved.get("model", {}), current.get("model", {})
    for key in sorted(set(old_model) | set(new_model)):
        if old_model.get(key) != new_model.get(key):
            changes.append(f"model {key} {old_model.get(key)!r} -> {new_model.get(key)!r}")
    names = {
        "tokenizer_hash": "tokenizer (vocabulary) hash",
        "data_hash": "prepared data hash",
        "seq_len": "sequence length",
        "seed": "seed (data order and masks)",
    }
    for key, name in names.items():
        if key in saved and saved.get(key) != current.get(key):
            changes.append(f"{name} {saved.get(key)!r} -> {current.get(key)!r}")
    return changes


def setting_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Settings that differ from those the checkpoint was trained with: {name: [old, new]}."""
    return {
        key: [saved.get(key), current.get(key)]
        for key in sorted(set(saved) | set(current))
        if key not in _NOT_COMPARED and saved.get(key) != current.get(key)
    }


def list_complete(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    found: list[CheckpointInfo] = []
    if not checkpoint_dir.is_dir():
        return found
    for child in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        marker = child / COMPLETE
        if not (match and marker.is_file()):
            continue
        try:
            meta = json.loads(marker.read_text())
            batch = meta.get("batch") if isinstance(meta.get("batch"), dict) else None
            found.append(CheckpointInfo(child, int(meta["step"]), int(meta["world_size"]), batch))
        except (ValueError, KeyError, TypeError):
            continue  # a torn marker: treat the folder as incomplete
    return sorted(found, key=lambda c: c.step)


def latest_complete(checkpoint_dir: Path) -> CheckpointInfo | None:
    complete = list_complete(checkpoint_dir)
    return complete[-1] if complete else None


def save(
    engine: Any,
    checkpoint_dir: Path,
    step: int,
    *,
    shared_state: dict[str, Any],
    rank_state: dict[str, Any],
    run_record: dict[str, Any],
    rank: int,
    world_size: int,
    keep: int,
    batch: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint on every rank (collective), mark it complete, prune old ones.

    A full disk is one line naming the folder and the space a checkpoint takes.
    """
    tag = f"step-{step}"
    folder = checkpoint_dir / tag
    if rank == 0:
        (folder / COMPLETE).unlink(missing_ok=True)  # rewriting a step: incomplete until done again
    _barrier()
    needed = _checkpoint_bytes(engine, checkpoint_dir)
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=shared_state)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, folder / f"rank-{rank}.pt")
        if rank == 0:
            (folder / RUN_RECORD).write_text(json.dumps(run_record, indent=2) + "\n")
        _fsync_tree(folder, rank)
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(exc, folder, needed)
        if full is None:
            raise
        shutil.rmtree(folder, ignore_errors=True)  # never resumed from; the space goes back now
        raise full from None
    _barrier()
    if rank == 0:
        marker_tmp = folder / f".{COMPLETE}.tmp"
        marker = {"step": step, "world_size": world_size, **({"batch": batch} if batch else {})}
        marker_tmp.write_text(json.dumps(marker) + "\n")
        with marker_tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(marker_tmp, folder / COMPLETE)
        _prune(checkpoint_dir, keep)
    _barrier()
    return folder


def _checkpoint_bytes(engine: Any, checkpoint_dir: Path) -> int:
    """The size of a checkpoint: the last one's, else 16 bytes a parameter (weights + Adam)."""
    last = latest_complete(checkpoint_dir)
    if last is not None:
        return folder_bytes(last.path)
    return 16 * sum(p.numel() for p in engine.module.parameters())


def remove_debris(run_dir: Path) -> list[Path]:
    """Temporary files and folders of a trainer that died mid-write (the caller holds the run lock,
    so no writer is alive): export `.tmp-*`/`.old-*` folders, half-written markers."""
    found: list[Path] = []
    export_dir, checkpoint_dir = run_dir / "export", run_dir / "checkpoints"
    if export_dir.is_dir():
        found += [p for p in export_dir.iterdir() if p.name.startswith((".tmp-", ".old-", ".latest.tmp"))]
    if checkpoint_dir.is_dir():
        found += list(checkpoint_dir.glob(f"step-*/.{COMPLETE}.tmp"))
    found += list(run_dir.glob(".*.tmp"))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _fsync_tree(folder: Path, rank: int) -> None:
    """Flush this rank's files so COMPLETE never reaches the disk before the data it vouches for."""
    for child in folder.iterdir():
        mine = rank == 0 or f"rank_{rank}_" in child.name or child.name == f"rank-{rank}.pt"
        if child.is_file() and mine:
            with child.open("rb") as f:
                os.fsync(f.fileno())


def _prune(checkpoint_dir: Path, keep: int) -> None:
    complete = list_complete(checkpoint_dir)
    keep_paths = {c.path for c in complete[-keep:]}
    for child in checkpoint_dir.iterdir():
        # older complete checkpoints, and incomplete folders: saves are sequential and the one just
        # written is complete, so an incomplete folder is debris of a process that died mid-save
        if _STEP_DIR.match(child.name) and child not in keep_paths:
            shutil.rmtree(child, ignore_errors=True)


def load(
    engine: Any, info: CheckpointInfo, *, rank: int, world_size: int, log: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a complete checkpoint; returns (shared client state, this rank's state or None).

    Same world size: everything, exactly. Different world size: the consolidated weights and the
    LR schedule, with a fresh optimizer partition (ZeRO-1 shards Adam moments per rank), said in the log.
    """
    same_world = info.world_size == world_size
    try:
        if same_world:
            path, client = engine.load_checkpoint(str(info.path.parent), tag=info.path.name)
        else:
            log(
                f"checkpoint step {info.step} was written by {info.world_size} rank(s), this run has "
                f"{world_size}: loading the consolidated weights and LR schedule with a fresh optimizer "
                f"state (Adam moments restart); the data order continues from the saved position"
            )
            path, client = engine.load_checkpoint(
                str(info.path.parent),
                tag=info.path.name,
                load_optimizer_states=False,
                load_lr_scheduler_states=True,
                load_module_only=False,
            )
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise MicroBertError(
            f"cannot resume from {info.path}: {exc}. Start afresh with --resume never "
            f"(or a new --run-dir), or resume with the {info.world_size} GPU(s) that wrote it"
        ) from None
    if path is None or client is None:
        raise MicroBertError(f"cannot resume from {info.path}: DeepSpeed found no checkpoint there")
    rank_file = info.path / f"rank-{rank}.pt"
    rank_state = torch.load(rank_file, weights_only=True) if same_world and rank_file.is_file() else None
    if rank_state is None and (info.path / "rank-0.pt").is_file():
        # another world size: the loader position is shared, the RNG streams are per rank and reseeded
        rank_state = {"loader": torch.load(info.path / "rank-0.pt", weights_only=True)["loader"]}
    return client, rank_state


def agree(value: Any) -> Any:
    """Rank 0's value on every rank (one small broadcast; the value itself without several ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- several nodes ---------------------------------------------------------------------------------
def require_shared_run_dir(run_dir: Path, nodes: Nodes) -> None:
    """DeepSpeed's sharded checkpoint is one folder every rank writes into: node-local disks fail now."""
    nodes.require_shared(
        run_dir,
        "run folder",
        "Checkpoints, exports and the run's status must be in one folder every node sees: put --run-dir "
        "on a shared filesystem (NFS, Lustre, a cloud file share) mounted at the same path on every node.",
    )


def batch_for_resume(
    info: CheckpointInfo, *, requested: dict[str, Any], micro_batch: int, world_size: int
) -> tuple[int, str | None]:
    """The gradient accumulation that keeps the checkpoint's global batch on a new number of ranks.

    requested: this run's batch settings as configured (`micro_batch_size`, which may be "auto",
    and `grad_accum`); micro_batch: the micro-batch actually used. Returns (grad_accum, what to log).
    When the world size (or an automatic micro-batch) changed but the settings did not (the same
    command on another node count), the accumulation is scaled so the global batch, and with it the
    LR schedule and the data order, carries on. Settings changed on purpose are followed, and the
    log says what that did.
    """
    saved, accum = info.batch, int(requested["grad_accum"])
    if saved is None:
        return accum, None
    target = int(saved["train_batch_size"])
    if micro_batch * accum * world_size == target:
        return accum, None
    if {k: saved["requested"][k] for k in requested} != requested:
        new = micro_batch * accum * world_size
        return accum, (
            f"global batch changed from {target} to {new} by the batch settings (micro-batch "
            f"{micro_batch} × accumulation {accum} × {world_size} rank(s))"
        )
    per_step = micro_batch * world_size
    if target % per_step:
        raise MicroBertError(
            f"checkpoint step {info.step} was trained with a global batch of {target} sequences "
            f"({saved['micro_batch_size']} × {saved['grad_accum']} × {info.world_size} rank(s)); on "
            f"{world_size} rank(s) with micro-batch {micro_batch} no gradient accumulation gives {target}: "
            f"pass --batch-size B --grad-accum A with B × A × {world_size} = {target} to keep it, or other "
            "values to continue with a new global batch"
        )
    new_accum = target // per_step
    return new_accum, (
        f"checkpoint written with micro-batch {saved['micro_batch_size']} on {info.world_size} rank(s), "
        f"this run has {micro_batch} on {world_size}: gradient accumulation {saved['grad_accum']} → "
        f"{new_accum} keeps the global batch of {target} sequences "
        f"({micro_batch} × {new_accum} × {world_size})"
    )
