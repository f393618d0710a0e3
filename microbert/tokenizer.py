"""Tokenizers trained with Hugging Face `tokenizers`, saved so `transformers.AutoTokenizer` loads them.

Two kinds:
- `wordpiece` (default): BERT's normaliser, pre-tokeniser, WordPiece model and `##` decoder;
- `wordlevel`: the seed's kind, one id per whitespace/punctuation-split word.

Both use the special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0–4, in that order) and wrap a
text as `[CLS] … [SEP]`. A saved tokenizer is `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json` (+ `vocab.txt` for WordPiece), the layout `transformers` writes.

Training is reproducible: the same texts and settings give the same `tokenizer.json`, byte for byte,
in any process on any machine. `tokenizers`' WordPiece (BPE) trainer is not, by itself
(huggingface/tokenizers#1794): it gives the `##x` continuing-subword tokens their ids in the
iteration order of a hash map seeded per process, and the merge loop breaks ties between pairs of
equal count by those ids, so two runs pick different merges. Here every `##x` the texts can produce
is registered before training, in code-point order, so every id — and every tie-break — is fixed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from microbert.errors import ArtifactError, ConfigError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
KINDS = ("wordpiece", "wordlevel")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# WordPiece encodes a longer word as [UNK] whole: such words teach the vocabulary nothing, and one of
# a few MB (text without spaces) would make the merge loop scan it once per merge, for minutes.
MAX_WORD_CHARS = 100
_CONTINUING = "##"
_LONG_RUN = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


def _post_processor(tok: Tokenizer) -> processors.TemplateProcessing:
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    return processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    kind: str = "wordpiece",
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a tokenizer from texts; the same texts and settings always give the same tokenizer.

    The texts are held in memory while training (they are read twice: once for the characters the
    vocabulary starts from, once by the trainer), so give a sample, as `prepare_dataset` does.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    tok = _empty_tokenizer(kind, lowercase)
    sample = list(_training_texts(texts, tok))
    if kind == "wordpiece":
        # registered first, as special tokens of the trainer, in code-point order (see the module doc)
        continuing = [_CONTINUING + c for c in sorted(_continuing_chars(sample, tok))]
        trainer: trainers.Trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS + continuing,
            continuing_subword_prefix=_CONTINUING,
            show_progress=False,
        )
    else:  # WordLevelTrainer sorts by (count, word): reproducible as it is
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        )
    tok.train_from_iterator(sample, trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        if sample:  # only words that were left out
            raise ConfigError(
                f"every word of the tokenizer's training text is longer than {MAX_WORD_CHARS} characters "
                "(text without spaces?), which WordPiece encodes as [UNK]: give text with words "
                "separated by spaces"
            )
        raise ConfigError("the tokenizer's training text is empty: give a source with some text in it")
    if kind == "wordpiece":
        # the same vocabulary, with only the five real special tokens left as added tokens
        vocab = tok.get_vocab(with_added_tokens=False)
        tok = _empty_tokenizer(kind, lowercase, vocab=vocab)
        tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = _post_processor(tok)
    _check_special_ids(tok)
    return tok


def _empty_tokenizer(kind: str, lowercase: bool, vocab: dict[str, int] | None = None) -> Tokenizer:
    """BERT's normaliser and pre-tokeniser around an untrained (or the given) vocabulary."""
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS))
        tok.decoder = decoders.WordPiece(prefix=_CONTINUING, cleanup=True)
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def _training_texts(texts: Iterable[str], tok: Tokenizer) -> Iterator[str]:
    """Non-empty texts, with the words WordPiece would encode as [UNK] whole left out."""
    for text in texts:
        if not text or text.isspace():
            continue
        if _LONG_RUN.search(text):  # rare: only then is the text split into words here
            normalized = tok.normalizer.normalize_str(text)
            words = tok.pre_tokenizer.pre_tokenize_str(normalized)
            text = " ".join(word for word, _ in words if len(word) <= MAX_WORD_CHARS)
            if not text:
                yield " "  # kept, so an all-long source is told apart from an empty one
                continue
        yield text


def _continuing_chars(texts: list[str], tok: Tokenizer) -> set[str]:
    """Every character that can follow another inside a word of these texts (after normalising).

    Normalisation and pre-tokenisation act on each character alone, so it is enough to look at the
    distinct characters: `c` contributes what follows "a" in the first word of `"a" + c`, normalised.
    A superset is harmless (an unused `##x` token); a missing one would make training irreproducible.
    """
    distinct: set[str] = set()
    for text in texts:
        distinct.update(text)
    found: set[str] = set()
    normalizer, pre = tok.normalizer, tok.pre_tokenizer
    for c in distinct:
        words = pre.pre_tokenize_str(normalizer.normalize_str("a" + c))
        if words and words[0][0].startswith("a"):
            found.update(words[0][0][1:])
    return found


def _check_special_ids(tok: Tokenizer) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise ArtifactError(
                f"tokenizer has {token} at id {tok.token_to_id(token)}, expected {expected_id}"
            )


def special_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of the special tokens the tokenizer has, looked up by name: 0–4 in MicroBERT's own
    tokenizers, but e.g. 0 and 100–103 in a `transformers` BERT vocabulary."""
    ids = [tok.token_to_id(token) for token in SPECIAL_TOKENS]
    return [i for i in ids if i is not None]


def mask_token_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(MASK)
    if token_id is None:
        raise ArtifactError(
            f"the tokenizer has no {MASK} token: it cannot be used for masked-language modelling"
        )
    return int(token_id)


def tokenizer_kind(tok: Tokenizer) -> str:
    return "wordpiece" if isinstance(tok.model, models.WordPiece) else "wordlevel"


def _lowercase(tok: Tokenizer) -> bool:
    state = json.loads(tok.to_str()).get("normalizer") or {}
    return bool(state.get("lowercase", False))


def tokenizer_hash(tok: Tokenizer) -> str:
    """A content hash of the tokenizer (vocabulary, normalisation, model): part of data cache keys."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer, folder: str | Path, *, model_max_length: int = 512) -> list[str]:
    """Write the `transformers` tokenizer files into folder; returns the file names written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    kind = tokenizer_kind(tok)
    special = {
        "unk_token": UNK,
        "sep_token": SEP,
        "pad_token": PAD,
        "cls_token": CLS,
        "mask_token": MASK,
    }
    lowercase = _lowercase(tok)
    config = {
        # BertTokenizerFast checks its normaliser against these flags and rebuilds it if they
        # differ, so they must describe the normaliser we trained.
        "tokenizer_class": "BertTokenizerFast" if kind == "wordpiece" else "PreTrainedTokenizerFast",
        "do_lower_case": lowercase,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "clean_up_tokenization_spaces": kind == "wordpiece",
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        "microbert_tokenizer_kind": kind,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    written = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    if kind == "wordpiece":
        vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
        written.append("vocab.txt")
    return written


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from folder, or build a BERT WordPiece tokenizer from `vocab.txt`."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ArtifactError(f"{folder / 'tokenizer.json'} is not a valid tokenizer: {exc}") from None
    elif (folder / "vocab.txt").is_file():
        tok = _from_vocab_txt(folder)
    else:
        raise ArtifactError(f"{folder} has no tokenizer: expected tokenizer.json or vocab.txt")
    if tok.token_to_id(mask_token(folder)) is None:
        raise ArtifactError(f"the tokenizer in {folder} has no mask token {mask_token(folder)}")
    return tok


def mask_token(folder: str | Path) -> str:
    """The mask token named by the folder's tokenizer config (`[MASK]` when none is named)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get("mask_token")
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(value, dict):  # transformers' AddedToken form
                value = value.get("content")
            if isinstance(value, str):
                return value
    return MASK


def _from_vocab_txt(folder: Path) -> Tokenizer:
    lowercase = True
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        lowercase = bool(json.loads(config_path.read_text()).get("do_lower_case", True))
    vocab = {
        line.rstrip("\n"): i
        for i, line in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines(True))
    }
    tok = _empty_tokenizer("wordpiece", lowercase, vocab=vocab)
    tok.post_processor = _post_processor(tok)
    return tok
