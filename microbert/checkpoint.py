"""The artifact folder: weights, config and tokenizer together, verifiable, loadable by `transformers`.

```
step-<N>/  model.safetensors  config.json  tokenizer.json  tokenizer_config.json
           special_tokens_map.json  vocab.txt (WordPiece)  manifest.json
```
A folder is written under a temporary name beside its final one and renamed when complete, so a
reader never sees half of one. `manifest.json` holds the sha256 of every other file; loading checks
it and names the file that is missing or altered. The check cannot be switched off by deleting the
manifest: the weights MicroBERT writes say so in their safetensors header, and a folder with such
weights and no manifest is refused. A folder written by `transformers`' `save_pretrained` (no
manifest, no mark — it writes its own header, even for a model it loaded from here) loads, with a
log line that it is unverified. `latest` may only name a folder directly inside `export/`.
Weights are safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from microbert.config import ModelConfig
from microbert.errors import ArtifactError, MicroBertError
from microbert.model import BertForMaskedLM
from microbert.tokenizer import load_tokenizer, mask_token, save_tokenizer

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "microbert-artifact/1"
MARK_KEY = "microbert"  # in the safetensors metadata of the weights MicroBERT writes
# Tied to the word embeddings: not stored, as `transformers` does not store them either.
_TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Buffers some `transformers` versions store; they are recomputed, never learned.
_IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(
    model: BertForMaskedLM,
    tokenizer: Tokenizer,
    folder: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write an artifact folder atomically (temporary name, then rename); returns its path.

    An existing folder of the same name is replaced only once the new one is complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in model.state_dict().items()
            if k not in _TIED_KEYS
        }
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", MARK_KEY: FORMAT})
        model.config.to_json(tmp / "config.json")
        files = [WEIGHTS, "config.json"]
        files += save_tokenizer(tokenizer, tmp, model_max_length=model.config.max_position_embeddings)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(metadata or {}),
            "files": {
                name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
        if folder.exists():
            old = folder.parent / f".old-{folder.name}-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
        _fsync_dir(folder.parent)
    except BaseException as exc:
        full = disk_full_error(exc, folder, _weights_bytes(model))  # before the space comes back
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    return folder


def _weights_bytes(model: BertForMaskedLM) -> int:
    return sum(v.numel() * 4 for k, v in model.state_dict().items() if k not in _TIED_KEYS)


def disk_full_error(exc: BaseException, folder: Path, needed: int) -> MicroBertError | None:
    """A full disk (or quota) while writing folder, as one line: where, how much is needed and free.

    The libraries that write the files report it in their own words: an `OSError` with ENOSPC,
    safetensors' "No space left on device", torch's "file write failed" (inline_container.cc).
    """
    try:
        free = shutil.disk_usage(_existing_parent(folder)).free
    except OSError:
        free = None
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        marker in text for marker in ("No space left on device", "Disk quota exceeded", "file write failed")
    )
    # torch may say only "[enforce fail at inline_container.cc] unexpected pos": judge by the space
    if not full and not (isinstance(exc, (OSError, RuntimeError, SafetensorError)) and free is not None):
        return None
    if not full and free is not None and free >= needed:
        return None
    free_text = "?" if free is None else f"{free / 2**20:,.1f}"
    return MicroBertError(
        f"the disk is full: writing {folder} needs about {needed / 2**20:,.1f} MiB and {free_text} MiB "
        "are free on its file system; free some space (or point --run-dir at a larger disk) and run "
        "the same command again to resume"
    )


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_file():
            with child.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def update_latest(export_dir: str | Path, step_folder: str | Path) -> None:
    """Point `export/latest` at a complete step folder (written to a temp file, then renamed)."""
    export_dir = Path(export_dir)
    tmp = export_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(Path(step_folder).name + "\n")
    os.replace(tmp, export_dir / LATEST)


def resolve_artifact_dir(path: str | Path) -> Path:
    """A run folder (its `export/latest`), an export folder (its `latest`) or an artifact folder."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: give a run folder or an artifact folder")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder: give a run folder or an artifact folder")
    for export in (path / "export", path):
        latest = export / LATEST
        if latest.is_file():
            try:
                name = latest.read_text().strip()
            except (OSError, UnicodeDecodeError):
                raise ArtifactError(f"{latest} is unreadable: it should name a step folder") from None
            target = export / name
            if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
                raise ArtifactError(
                    f"{latest} names {name!r}: it may only name a folder directly inside {export} "
                    "(like step-20)"
                )
            if not target.is_dir():
                raise ArtifactError(f"{latest} names {name!r}, which is not a folder in {export}")
            if target.resolve().parent != export.resolve():
                raise ArtifactError(f"{latest} names {name!r}, a link that leads outside {export}")
            return target
    if (path / "config.json").is_file():
        return path
    if (path / "export").is_dir():
        raise ArtifactError(f"{path} has no exported model yet ({path / 'export' / LATEST} is missing)")
    raise ArtifactError(
        f"{path} is neither a run folder (with export/{LATEST}) nor an artifact folder (with config.json)"
    )


def verify_artifact(folder: str | Path) -> dict[str, Any] | None:
    """Check every file against `manifest.json`; returns the manifest (None for a folder without one)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        mark = microbert_mark(folder)
        if mark is not None:
            raise ArtifactError(
                f"{folder} was written by MicroBERT ({mark}) but its {MANIFEST} is missing, so its "
                f"files cannot be verified: copy the whole folder again from where it was written"
            )
        log.warning(
            "%s has no %s (a transformers save_pretrained folder?): its files are loaded unverified",
            folder,
            MANIFEST,
        )
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ArtifactError(f"{manifest_path} is not a valid manifest") from None
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is incomplete: {name} is missing (listed in {MANIFEST})")
        if _sha256(path) != entry.get("sha256"):
            raise ArtifactError(f"{folder} is altered: {name} does not match its sha256 in {MANIFEST}")
    return dict(manifest)


def microbert_mark(folder: Path) -> str | None:
    """How folder says MicroBERT wrote it (None for a folder from elsewhere)."""
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
            if MARK_KEY in (weights.metadata() or {}):
                return f"{WEIGHTS} says so in its header"
    except Exception:  # no weights, or a header that does not parse: loading will say which
        pass
    return None


@dataclass
class Artifact:
    model: BertForMaskedLM
    tokenizer: Tokenizer
    mask_token: str
    path: Path
    manifest: dict[str, Any] | None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def step(self) -> int | None:
        return None if self.manifest is None else self.manifest.get("step")


def load_artifact(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Artifact:
    """Load and verify an artifact folder (or a run folder's newest export) for inference."""
    folder = resolve_artifact_dir(path)
    manifest = verify_artifact(folder)
    config = ModelConfig.from_json(folder / "config.json")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{folder} has no {WEIGHTS} (only safetensors weights are loaded)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights} is not a readable safetensors file: {exc}") from None
    model = BertForMaskedLM(config)
    load_state_dict(model, state, source=str(weights))
    model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(folder)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ArtifactError(
            f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{config.vocab_size} embeddings"
        )
    return Artifact(model, tokenizer, mask_token(folder), folder, manifest)


def load_state_dict(model: BertForMaskedLM, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a `transformers`-named state dict; tied and buffer keys may be present or not."""
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS and not k.startswith("bert.pooler.")}
    decoder = state.pop("cls.predictions.decoder.weight", None)
    state.pop("cls.predictions.decoder.bias", None)
    if "bert.embeddings.word_embeddings.weight" not in state and decoder is not None:
        state["bert.embeddings.word_embeddings.weight"] = decoder
    expected = {k for k in model.state_dict() if k not in _TIED_KEYS}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{source} does not match the config: {exc}") from None
    model.tie_weights()
