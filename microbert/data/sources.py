"""Text sources: what `--dataset` names, resolved to a stream of documents.

A source is resolved up front (`resolve_source`) so every user mistake — a missing path, an empty
file, an unknown name — is reported before any work starts. Its `identity` (what goes into the cache
key) says what the text *is*: the embedded corpus's content hash, a local file's path, size and
modification time, a Hub repository and configuration. Streaming and downloaded modes of the same
source yield the same documents in the same order, so the mode is not part of the identity.

Documents: a `.txt` file's documents are its paragraphs (text separated by blank lines); a structured
file's or Hub dataset's documents are the rows' `text_column`. Empty documents are skipped.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from microbert.errors import ConfigError, MicroBertError, unknown_name

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
# A book shipped beside the embedded corpus but never part of it (corpus/heldout/): text of the
# training data's kind that the `cpu` profile's model has never seen, for an honest score offline.
HELDOUT_NAME = "embedded-heldout"
TEXT_SUFFIXES = (".txt", ".txt.gz")
# suffix -> `datasets` packaged builder that reads it
STRUCTURED_SUFFIXES = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + tuple(STRUCTURED_SUFFIXES)
_READ_BLOCK = 4 << 20  # bytes read from a text file at a time: memory stays flat for any file size
# a text without blank lines is cut into documents of at most this many characters, at line ends,
# so that memory stays bounded whatever the file looks like
_MAX_DOCUMENT_CHARS = 1 << 20
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_HUB_PROBE_SECONDS = 3.0


class DataSourceError(MicroBertError):
    """A data source that cannot be read: missing, empty, not text, unknown, or unreachable."""


@dataclass(frozen=True)
class HubDataset:
    """A named Hub dataset: repository, configuration, the splits read (in order), a row filter."""

    repo: str
    config: str | None = None
    splits: tuple[str, ...] = ("train",)
    text_column: str = "text"
    # (column, value): keep rows whose column equals value — `pile-cc` is one subset of a mixed set
    filter: tuple[str, str] | None = None
    note: str = ""


HUB_DATASETS: dict[str, HubDataset] = {
    "imdb": HubDataset("stanfordnlp/imdb", None, ("train", "unsupervised"), note="movie reviews, 75k"),
    "wikitext-103": HubDataset(
        "Salesforce/wikitext", "wikitext-103-raw-v1", note="Wikipedia articles, 1.8M lines"
    ),
    "wikitext-2": HubDataset(
        "Salesforce/wikitext", "wikitext-2-raw-v1", note="Wikipedia articles, 37k lines"
    ),
    "wikipedia": HubDataset("wikimedia/wikipedia", "20231101.en", note="English Wikipedia, 6.4M articles"),
    "openwebtext": HubDataset("Skylion007/openwebtext", None, note="8M web pages"),
    "c4": HubDataset("allenai/c4", "en", note="Colossal Clean Crawled Corpus, 365M pages"),
    "pile-cc": HubDataset(
        "monology/pile-uncopyrighted",
        None,
        filter=("meta.pile_set_name", "Pile-CC"),
        note="the Pile's Common Crawl",
    ),
}
ALIASES = {"wikitext-103-raw-v1": "wikitext-103", "wikitext-2-raw-v1": "wikitext-2"}
KNOWN_NAMES = ("embedded", HELDOUT_NAME, *HUB_DATASETS, *ALIASES)


def local_override_var(name: str) -> str:
    """The environment variable that points a named Hub source at a local copy in the Hub's schema."""
    return "MICROBERT_DATASET_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


@dataclass(frozen=True)
class Source:
    """A resolved data source. `files` for local and embedded sources, `hub` for Hub datasets."""

    name: str  # as the user should see it: "embedded", "/abs/path", "imdb", "hf:repo:config"
    kind: str  # "embedded" | "local" | "hub"
    identity: dict[str, Any]
    files: tuple[Path, ...] = ()
    hub: HubDataset | None = None
    text_column: str = "text"
    # for a named Hub source redirected to local files (MICROBERT_DATASET_<NAME>): the files are read
    # by the same `datasets` code path as the Hub repository would be
    local_hub_files: tuple[Path, ...] = field(default=())

    @property
    def slug(self) -> str:
        """A short, file-name-safe label for cache folder names."""
        base = Path(self.name).name if self.kind == "local" else self.name.removeprefix("hf:")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40].strip("_.") or "source"


def resolve_source(source: str | os.PathLike[str], *, text_column: str = "text") -> Source:
    """Turn a `--dataset` value into a `Source`, checking that it exists and is not empty."""
    text = os.fspath(source).strip()
    if not text:
        raise DataSourceError(
            "--dataset is empty; give `embedded`, a path, a dataset name or hf:<repo>[:<config>]"
        )
    if text in ("embedded", HELDOUT_NAME):
        folder = CORPUS_DIR if text == "embedded" else CORPUS_DIR / "heldout"
        files = tuple(sorted(folder.glob("*.txt.gz")))
        if not files:
            raise DataSourceError(f"the embedded corpus is missing from {folder}; reinstall microbert")
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return Source(text, "embedded", {text: digest.hexdigest()[:16]}, files=files)
    if text.startswith("hf:"):
        repo, _, config = text[3:].partition(":")
        if not repo or repo.count("/") > 1:
            raise DataSourceError(f"{text!r} is not a Hub dataset: write hf:<owner>/<name>[:<config>]")
        hub = HubDataset(repo, config or None, text_column=text_column)
        return _hub_source(text, hub, text_column)
    name = ALIASES.get(text.lower(), text.lower())
    if name in HUB_DATASETS:
        hub = HUB_DATASETS[name]
        column = text_column if text_column != "text" else hub.text_column
        override = os.environ.get(local_override_var(name))
        if override:
            files = _local_files(Path(override).expanduser())
            return Source(
                name,
                "hub",
                {"hub_local": name, "files": _fingerprint(files), "column": column},
                hub=hub,
                text_column=column,
                local_hub_files=files,
            )
        return _hub_source(name, hub, column)
    path = Path(text).expanduser()
    if path.exists() or os.sep in text or text.startswith(".") or Path(text).suffix:
        files = _local_files(path)
        return Source(
            str(path.resolve()),
            "local",
            {"files": _fingerprint(files), "column": text_column},
            files=files,
            text_column=text_column,
        )
    raise DataSourceError(
        unknown_name("dataset", text, KNOWN_NAMES)
        + "; or a local path, or hf:<repo>[:<config>] for any Hub dataset"
    )


def _hub_source(name: str, hub: HubDataset, column: str) -> Source:
    identity = {"hub": hub.repo, "config": hub.config, "splits": list(hub.splits), "column": column}
    if hub.filter:
        identity["filter"] = list(hub.filter)
    return Source(name, "hub", identity, hub=hub, text_column=column)


def _local_files(path: Path) -> tuple[Path, ...]:
    if not path.exists():
        raise DataSourceError(f"{path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SUPPORTED_SUFFIXES)
        if not files:
            raise DataSourceError(
                f"{path} holds no data files: expected {', '.join(SUPPORTED_SUFFIXES)} files in it or below"
            )
    else:
        if _suffix(path) not in SUPPORTED_SUFFIXES:
            raise DataSourceError(
                f"{path}: unsupported file type {''.join(path.suffixes) or '(none)'}; "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
        files = [path]
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty and len(empty) == len(files):
        raise DataSourceError(
            f"{', '.join(empty)}: empty file{'s' if len(empty) > 1 else ''}, no text to prepare"
        )
    return tuple(p.resolve() for p in files if p.stat().st_size > 0)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _fingerprint(files: tuple[Path, ...]) -> list[list[Any]]:
    """Path, size and modification time: a changed file gets a new cache key, without hashing GBs."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def iter_documents(
    source: Source, *, streaming: bool = False, hf_cache_dir: str | Path | None = None
) -> Iterator[str]:
    """Every non-empty document of the source, in a fixed order, read incrementally."""
    if source.kind in ("embedded", "local"):
        for path in source.files:
            if _suffix(path) in TEXT_SUFFIXES:
                yield from _text_file_documents(path)
            else:
                yield from _structured_documents(path, source.text_column, streaming, hf_cache_dir)
    elif source.local_hub_files:
        for path in source.local_hub_files:
            if _suffix(path) in TEXT_SUFFIXES:
                yield from _text_file_documents(path)
            else:
                yield from _structured_documents(path, source.text_column, streaming, hf_cache_dir)
    else:
        assert source.hub is not None
        yield from _hub_documents(source, streaming, hf_cache_dir)


def _text_file_documents(path: Path) -> Iterator[str]:
    """Paragraphs of a (possibly gzipped) UTF-8 text file, read in blocks; binary files are refused."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    carry = ""
    try:
        with opener(path, "rb") as handle:
            while True:
                block = handle.read(_READ_BLOCK)
                if offset == 0 and b"\0" in block[:8192]:
                    raise DataSourceError(
                        f"{path} looks like a binary file (it has NUL bytes), not UTF-8 text"
                    )
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    raise DataSourceError(
                        f"{path} is not UTF-8 text (invalid byte at offset {offset + exc.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                offset += len(block)
                if not block:
                    break
                if offset == len(block):
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not text
                pieces = _PARAGRAPH_BREAK.split(carry + text.replace("\r\n", "\n"))
                carry = pieces.pop()
                if len(carry) > _MAX_DOCUMENT_CHARS:  # no blank line for megabytes: cut at a line end
                    cut = carry.rfind("\n", 0, _MAX_DOCUMENT_CHARS) + 1 or _MAX_DOCUMENT_CHARS
                    pieces.append(carry[:cut])
                    carry = carry[cut:]
                for piece in pieces:
                    if piece and not piece.isspace():
                        yield piece.strip("\n")
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataSourceError(f"cannot read {path}: {exc}") from None
    if carry and not carry.isspace():
        yield carry.strip("\n")


def _structured_documents(
    path: Path, column: str, streaming: bool, hf_cache_dir: str | Path | None
) -> Iterator[str]:
    builder = STRUCTURED_SUFFIXES[_suffix(path)]
    dataset = _load(builder, None, "train", streaming, hf_cache_dir, data_files=[str(path)], what=str(path))
    yield from _rows(dataset, column, None, what=str(path))


def _hub_documents(source: Source, streaming: bool, hf_cache_dir: str | Path | None) -> Iterator[str]:
    hub = source.hub
    assert hub is not None
    with _offline_when_unreachable():
        for split in hub.splits:
            dataset = _load(hub.repo, hub.config, split, streaming, hf_cache_dir, what=source.name)
            yield from _rows(dataset, source.text_column, hub.filter, what=f"{source.name} ({hub.repo})")


def _load(
    path: str,
    config: str | None,
    split: str,
    streaming: bool,
    hf_cache_dir: str | Path | None,
    *,
    what: str,
    data_files: list[str] | None = None,
) -> Any:
    import datasets  # slow to import; only sources that need it pay for it

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            path,
            config,
            split=split,
            streaming=streaming,
            data_files=data_files,
            cache_dir=None if hf_cache_dir is None else str(hf_cache_dir),
        )
    except Exception as exc:  # `datasets` raises many types; all mean "cannot read this source"
        raise _load_error(what, path, config, exc) from None


def _load_error(what: str, path: str, config: str | None, exc: Exception) -> DataSourceError:
    if "/" in path or path not in ("json", "csv", "parquet", "text"):
        if _hub_offline() or isinstance(exc, ConnectionError):
            name = what if what in HUB_DATASETS else None
            hint = f", set {local_override_var(name)}=<local copy in the Hub's schema>" if name else ""
            return DataSourceError(
                f"cannot load {what}: the Hugging Face Hub ({path}{':' + config if config else ''}) is not "
                f"reachable (offline or no network) and the dataset is not in the local cache. Use a local "
                f"path (--dataset /path/to/files){hint}, or prepare on a machine with Hub access and copy "
                f"the cache folder (MICROBERT_CACHE_DIR)"
            )
        return DataSourceError(f"cannot load {what} from the Hugging Face Hub: {_describe(exc)}")
    return DataSourceError(f"cannot read {what}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """The root cause of a wrapped exception ("An error occurred while generating the dataset")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}"


def _rows(dataset: Any, column: str, row_filter: tuple[str, str] | None, *, what: str) -> Iterator[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise DataSourceError(
            f"{what} has no column {column!r}; columns: {', '.join(names)} (use --text-column)"
        )
    try:
        for batch in dataset.iter(batch_size=1024):
            if column not in batch:
                raise DataSourceError(
                    f"{what} has no column {column!r}; columns: {', '.join(batch)} (use --text-column)"
                )
            texts = batch[column]
            if row_filter is not None:
                key, value = row_filter
                keep = [
                    _dotted(row_meta, key.split(".")[1:]) == value for row_meta in batch[key.split(".")[0]]
                ]
                texts = [t for t, k in zip(texts, keep, strict=True) if k]
            for text in texts:
                if isinstance(text, str) and text and not text.isspace():
                    yield text
    except MicroBertError:
        raise
    except Exception as exc:  # a corrupt file, a dropped connection mid-stream
        raise DataSourceError(f"cannot read {what}: {_describe(exc)}") from None


def _dotted(value: Any, keys: list[str]) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _hub_offline() -> bool:
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _offline_when_unreachable() -> Iterator[None]:
    """Switch `datasets` to offline mode when the Hub cannot be reached within a few seconds.

    Without this, `datasets` retries for about 25 s before failing; offline mode instead answers
    from the local cache at once, or fails at once with a message we can explain.
    """
    import datasets.config
    import huggingface_hub.constants

    if _hub_offline() or _hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


# 20000, 1.5, 1_000 or 1,000 (separators only between groups of three digits, so 1,5k is refused)
_COUNT = re.compile(r"\s*(\d{1,3}(?:[_,]\d{3})+|\d+)(?:\.(\d+))?\s*([kKmMbB]?)\s*")
_COUNT_SCALES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_count(value: str | int | None, *, what: str = "--max-samples") -> int | None:
    """`500k`, `1.5M`, `1B`, `20000`, `1_000` -> an int; None, "", "none", "all" -> None (no limit).

    The one parser of counts, for `microbert data prepare` and `microbert-train` alike. Decimal
    arithmetic is exact (4.1M is 4100000, where floats give 4099999.9999999995), and a count that is not
    a whole number (1.0005k) is refused rather than rounded to something the user did not write.
    """
    if value is None or value == "" or (isinstance(value, str) and value.lower() in ("none", "all")):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _COUNT.fullmatch(str(value))
        if not match:
            raise ConfigError(f"{what} must be a count like 20000, 500k, 5M or 1B, got {value!r}")
        whole, decimals, suffix = match.groups()
        exact = Fraction(f"{whole.replace('_', '').replace(',', '')}.{decimals or 0}")
        exact *= _COUNT_SCALES[suffix.lower()]
        if exact.denominator != 1:
            raise ConfigError(f"{what} must be a whole number, got {value!r} ({float(exact):g})")
        number = int(exact)
    if number <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return number
