"""The on-disk cache: where it lives, how entries are named and written, what `microbert cache` shows.

Layout (under `$MICROBERT_CACHE_DIR`, default `~/.cache/microbert`):

    datasets/<slug>-<key>/      one prepared dataset, content-addressed
        meta.json               written last: an entry without it is unfinished (never read as data)
        tokenizer.json …        the tokenizer the ids belong to
        train.bin  eval.bin     packed rows, (sequences, seq_len) uint16/uint32, memory-mapped
        progress.json  shard-*  only while preparing: finished shards and where to resume
    tokenizers/<source>-v<vocab>-<hash>/   a tokenizer trained on a source, shared by its sequence lengths
    locks/<key>.lock            one preparer per key; other processes wait on it
    hf-datasets/                `datasets`' own cache for downloaded Hub and structured files

Every file is written to a temporary name, flushed to disk and renamed, so a reader sees either the
whole file or none of it. A full disk becomes a `CacheWriteError` that says so; the partial file is
removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from microbert.errors import MicroBertError

ENV_VAR = "MICROBERT_CACHE_DIR"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"


class CacheWriteError(MicroBertError):
    """The cache could not be written (full disk, no permission); nothing half-written is kept."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: the argument, else $MICROBERT_CACHE_DIR, else ~/.cache/microbert."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "microbert"
    return Path(cache_dir).expanduser()


def datasets_dir(root: Path) -> Path:
    return root / "datasets"


def hf_datasets_dir(root: Path) -> Path:
    return root / "hf-datasets"


def tokenizers_dir(root: Path) -> Path:
    return root / "tokenizers"


def locks_dir(root: Path) -> Path:
    return root / "locks"


def write_bytes_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Write chunks to `path` via a temporary file + fsync + rename; returns the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = 0
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                written += _write(handle, chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _write(handle: Any, chunk: bytes | memoryview) -> int:
    """The one place data reaches the disk (tests inject a full disk here)."""
    return handle.write(chunk)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, [(json.dumps(data, indent=2, sort_keys=True) + "\n").encode()])


def _write_error(path: Path, exc: OSError) -> CacheWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheWriteError(
            f"the disk is full while writing {path}: free some space (`microbert cache usage`, "
            f"`microbert cache clear`) or point {ENV_VAR} at a larger disk; finished shards are kept "
            "and the next run resumes"
        )
    return CacheWriteError(f"cannot write {path}: {exc.strerror or exc}")


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc) from None
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def list_entries(root: Path) -> list[dict[str, Any]]:
    """One row per prepared (or unfinished) dataset in the cache, newest first."""
    rows: list[dict[str, Any]] = []
    folder = datasets_dir(root)
    if not folder.is_dir():
        return rows
    for entry in folder.iterdir():
        if not entry.is_dir():
            continue
        meta = read_json(entry / META_FILE)
        progress = read_json(entry / PROGRESS_FILE) if meta is None else None
        row: dict[str, Any] = {
            "cache_key": entry.name,
            "path": str(entry),
            "complete": meta is not None,
            "bytes": folder_bytes(entry),
            "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry.stat().st_mtime)),
        }
        info = meta or _unfinished_info(progress)
        for key in ("source", "seq_len", "vocab_size", "documents", "tokens", "sequences", "max_samples"):
            if key in info:
                row[key] = info[key]
        if progress is not None:
            row["finished_shards"] = len(progress.get("shards", []))
        rows.append(row)
    rows.sort(key=lambda r: r["modified"], reverse=True)
    return rows


def _unfinished_info(progress: dict[str, Any] | None) -> dict[str, Any]:
    """What an unfinished entry is, from its cache key, and what its committed shards hold so far."""
    if not progress:
        return {}
    key = progress.get("key") or {}
    info = {name: key[name] for name in ("seq_len", "max_samples") if name in key}
    tokenizer = key.get("tokenizer")  # a trained tokenizer's recipe, or the given one's hash
    if isinstance(tokenizer, dict) and "vocab_size" in tokenizer:
        info["vocab_size"] = tokenizer["vocab_size"]
    if "documents" in progress:
        info["documents"] = progress["documents"]
    return info


def usage(root: Path) -> dict[str, Any]:
    """Bytes used by the cache, split by what uses them."""
    entries = list_entries(root)
    return {
        "cache_dir": str(root),
        "datasets_bytes": sum(e["bytes"] for e in entries),
        "unfinished_bytes": sum(e["bytes"] for e in entries if not e["complete"]),
        "tokenizers_bytes": folder_bytes(tokenizers_dir(root)),
        "hf_datasets_bytes": folder_bytes(hf_datasets_dir(root)),
        "total_bytes": folder_bytes(root) if root.is_dir() else 0,
        "entries": len(entries),
    }


def clear(root: Path, keys: Iterable[str] = (), *, unfinished_only: bool = False) -> list[str]:
    """Delete the named entries (all when none are named, with tokenizers and Hub downloads)."""
    from filelock import FileLock, Timeout

    keys = list(keys)
    known = {e["cache_key"]: e for e in list_entries(root)}
    missing = [k for k in keys if k not in known]
    if missing:
        raise MicroBertError(f"no cache entry {', '.join(missing)}; see `microbert cache info`")
    chosen = [known[k] for k in keys] if keys else list(known.values())
    if unfinished_only:
        chosen = [e for e in chosen if not e["complete"]]
    removed = []
    if chosen:
        ensure_dir(locks_dir(root))
    for entry in chosen:
        # an entry being prepared right now is skipped, not pulled from under its writer
        lock = FileLock(str(locks_dir(root) / f"{entry['cache_key']}.lock"))
        try:
            with lock.acquire(timeout=0):
                shutil.rmtree(entry["path"], ignore_errors=True)
                removed.append(entry["cache_key"])
        except Timeout:
            continue
    if not keys and not unfinished_only:
        for folder in (tokenizers_dir(root), hf_datasets_dir(root)):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
    return removed
