"""Sources: documents read as documented, and every bad input refused with a message naming it."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from microbert.data import sources
from microbert.data.sources import DataSourceError, iter_documents, parse_count, resolve_source
from microbert.errors import ConfigError


def test_text_file_paragraphs_survive_block_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paragraphs = [f"paragraph {i} line one\nline two é" for i in range(200)]
    path = tmp_path / "t.txt"
    path.write_text("\ufeff" + "\n\n".join(paragraphs) + "\n\n  \n\n", encoding="utf-8")
    monkeypatch.setattr(sources, "_READ_BLOCK", 37)  # blocks end mid-paragraph and mid-character
    assert list(iter_documents(resolve_source(path))) == paragraphs


def test_text_without_blank_lines_is_cut_at_line_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "_READ_BLOCK", 64)
    monkeypatch.setattr(sources, "_MAX_DOCUMENT_CHARS", 100)
    lines = [f"line {i} of a file with no paragraphs" for i in range(50)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    docs = list(iter_documents(resolve_source(path)))
    assert len(docs) > 10 and all(len(d) <= 100 for d in docs)
    assert "\n".join(docs).split("\n") == lines  # cut between lines, nothing lost


def test_gzipped_text_and_folder_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n\nthird\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as handle:
        handle.write("first\n")
    (tmp_path / "notes.md").write_text("ignored: not a data file")
    assert list(iter_documents(resolve_source(tmp_path))) == ["first", "second", "third"]


def test_embedded_corpus_is_shipped_and_has_no_imdb() -> None:
    src = resolve_source("embedded")
    assert sorted(p.name for p in src.files) == ["gutenberg.txt.gz", "tinyshakespeare.txt.gz"]
    first = next(iter_documents(src))
    assert first == "[Emma by Jane Austen 1816]"
    assert not any("imdb" in p.name.lower() for p in sources.CORPUS_DIR.iterdir())


def test_jsonl_text_column(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"row {i}", "label": i}) for i in range(5)) + "\n")
    assert list(iter_documents(resolve_source(path, text_column="body"))) == [f"row {i}" for i in range(5)]
    with pytest.raises(DataSourceError, match=r"no column 'text'.*body.*--text-column"):
        list(iter_documents(resolve_source(path)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope.txt", r"nope\.txt does not exist"),
        (lambda d: _write(d / "empty.txt", b""), r"empty\.txt: empty file"),
        (lambda d: (d / "emptydir").mkdir() or d / "emptydir", r"emptydir holds no data files"),
        (lambda d: _write(d / "weights.bin", b"\x00\x01"), r"weights\.bin: unsupported file type \.bin"),
    ],
)
def test_bad_paths_are_named(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        resolve_source(make(tmp_path))


def test_binary_and_non_utf8_files_are_named(tmp_path: Path) -> None:
    binary = _write(tmp_path / "blob.txt", b"\x7fELF\x00\x00\x01" * 100)
    with pytest.raises(DataSourceError, match=r"blob\.txt looks like a binary file"):
        list(iter_documents(resolve_source(binary)))
    latin1 = _write(tmp_path / "latin.txt", "café au lait\n\nnaïve".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin\.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        list(iter_documents(resolve_source(latin1)))


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataSourceError) as info:
        resolve_source("wikitext-9000")
    for name in ("embedded", "imdb", "wikitext-103", "c4", "pile-cc", "hf:<repo>"):
        assert name in str(info.value)


def test_hub_source_offline_fails_at_once_with_advice(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        next(iter_documents(resolve_source("wikitext-2"), hf_cache_dir=tmp_path))
    assert time.perf_counter() - started < 15
    message = str(info.value)
    assert "Salesforce/wikitext:wikitext-2-raw-v1" in message and "not reachable" in message
    assert "local path" in message and "MICROBERT_DATASET_WIKITEXT_2" in message


def test_named_hub_source_can_point_at_a_local_copy(imdb_head: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROBERT_DATASET_IMDB", str(imdb_head))
    src = resolve_source("imdb")
    assert src.kind == "hub" and src.hub is not None and src.hub.repo == "stanfordnlp/imdb"
    docs = list(iter_documents(src, streaming=True))
    assert len(docs) == 400 and docs[0].startswith("Bromwell High is a cartoon comedy")


def test_parse_count() -> None:
    assert parse_count("500k") == 500_000
    assert parse_count("5M") == 5_000_000
    assert parse_count("1.5B") == 1_500_000_000
    assert parse_count(20000) == 20000 and parse_count(None) is None
    for bad in ("lots", "-5", "0", "5 MB"):
        with pytest.raises(ConfigError):
            parse_count(bad)


def test_parse_count_is_exact_and_refuses_what_it_would_round() -> None:
    """One parser for `microbert data prepare` and `microbert-train`: decimals are exact (floats made
    4.1M 4099999.9999999995, which the trainer refused), separators sit between groups of three digits,
    and a count that is not whole is an error, never rounded to a number the user did not write."""
    cases = {"10k": 10_000, "1.5M": 1_500_000, "25000": 25_000, "4.1M": 4_100_000, "8.12k": 8_120}
    cases |= {"1_000": 1_000, "1,000,000": 1_000_000, " 5 M ": 5_000_000, "all": None}
    assert {text: parse_count(text) for text in cases} == cases
    for bad in ("1.0005k", "1,5k", "1.5", "12,34", "1e3"):
        with pytest.raises(ConfigError, match="--max-samples"):
            parse_count(bad)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_non_utf8_structured_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.jsonl", b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match=r"cannot read .*latin\.jsonl: UnicodeDecodeError"):
        list(iter_documents(resolve_source(path)))
