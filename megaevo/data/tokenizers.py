"""Tokenizers: train a SentencePiece BPE model; load SentencePiece or Hugging Face tokenizers behind one interface.

Every tokenizer offers `encode(text) -> list[int]` (no bos/eos added), `decode(ids) -> str`, and the
properties `vocab_size`, `bos_id`, `eos_id`, `pad_id` and `eod_id` (the end-of-document token, the
same as eos). A special token the tokenizer does not have is None. Tokenizers pickle by content, so
worker processes get an identical copy.
"""
from __future__ import annotations

import abc
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

from megaevo.data import DataError, readers
from megaevo.log import get_logger

logger = get_logger(__name__)

# Ids of the control pieces of every model `train_sentencepiece` writes.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Special tokens a chat template needs; they get ids 4.. in trained models and never split.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# 4 control pieces + chat tokens + 256 byte-fallback pieces, and at least one learned piece.
MIN_VOCAB_SIZE = 4 + len(CHAT_TOKENS) + 256 + 1
# Longest training sentence in UTF-8 bytes (SentencePiece drops longer ones, so we cut them first).
MAX_SENTENCE_BYTES = 4096
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

# Names that common tokenizers give their special tokens, in order of preference.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<BOS>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<EOS>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<PAD>", "<|padding|>")


class TokenizerError(DataError):
    """A tokenizer file that cannot be read, or training inputs and settings that cannot give a tokenizer."""


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements."""

    path: Path

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.path})"

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one whole token (a piece or special token), or None when it is not in the vocabulary."""
        ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int | None:
        ...

    @property
    def eod_id(self) -> int | None:
        return self.eos_id

    def __repr__(self) -> str:
        return f"{self.name} vocab_size={self.vocab_size} bos={self.bos_id} eos={self.eos_id} pad={self.pad_id}"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: SentencePiece model not found")
        self._load(self.path.read_bytes())

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm

        if not proto:
            raise TokenizerError(f"{self.path}: empty file, not a SentencePiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({str(e).strip() or 'unparsable'})") from None

    def __getstate__(self):
        return {"path": str(self.path), "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _id(self, i: int) -> int | None:
        return i if i >= 0 else None

    @property
    def bos_id(self) -> int | None:
        return self._id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return self._id(self._sp.pad_id())


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the file, or a directory holding it), read with the `tokenizers` package.

    bos/eos/pad come from `tokenizer_config.json` beside it when that names them; otherwise they
    are recognised by name among the added tokens.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: Hugging Face tokenizer.json not found")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ImportError(
                f"{self.path}: reading a Hugging Face tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from None
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exception
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        config = self._read_config(self.path.parent / "tokenizer_config.json")
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        self._bos = self._special(config, "bos_token", _BOS_NAMES, added)
        self._eos = self._special(config, "eos_token", _EOS_NAMES, added)
        self._pad = self._special(config, "pad_token", _PAD_NAMES, added)

    @staticmethod
    def _read_config(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
        config["__path__"] = str(path)
        return config

    def _special(self, config: dict | None, key: str, names: tuple[str, ...], added: set[str]) -> int | None:
        if config is not None and key in config:
            value = config[key]
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise TokenizerError(f"{config['__path__']}: {key} must be a string or {{\"content\": ...}}, got {value!r}")
            i = self._tok.token_to_id(value)
            if i is None:
                raise TokenizerError(f"{config['__path__']}: {key} {value!r} is not in the vocabulary of {self.path}")
            return i
        for token in names:
            if token in added:
                return self._tok.token_to_id(token)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad


def load_tokenizer(path: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A tokenizer from a SentencePiece `.model`, a `tokenizer.json`, or a directory holding either."""
    if isinstance(path, Tokenizer):
        return path
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise TokenizerError(f"{p}: directory holds neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer not found")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return HFTokenizer(p)
    with open(p, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return HFTokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except ValueError:
        raise TokenizerError(
            f"{p}: unknown tokenizer format (expected a SentencePiece .model, a Hugging Face tokenizer.json, "
            "or a directory holding one)"
        ) from None


# -- training ------------------------------------------------------------------------------------

def split_text(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Cut text into pieces of at most max_bytes UTF-8 bytes that join back to text.

    Cuts fall after the last newline that fits, else before the last space, else at a character
    boundary, so that short lines stay together (and newline/indent pieces can be learned).
    """
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text] if text else []
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be at least 4 (one UTF-8 character), got {max_bytes}")
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        cut = data.rfind(b"\n", start, end) + 1
        if cut <= start:
            cut = data.rfind(b" ", start + 1, end)
        if cut <= start:
            cut = end
            while data[cut] & 0xC0 == 0x80:  # inside a multi-byte character
                cut -= 1
        pieces.append(data[start:cut].decode("utf-8"))
        start = cut
    pieces.append(data[start:].decode("utf-8"))
    return pieces


def is_jsonl(path: str | os.PathLike) -> bool:
    """Whether an input file name says JSON lines (`.jsonl`, `.json`, `.ndjson`, optionally `.gz` or `.zst`)."""
    name = Path(path).name.lower()
    for compressed in (".gz", ".zst"):
        name = name.removesuffix(compressed)
    return name.endswith(JSONL_SUFFIXES)


def _file_texts(path: Path, json_key: str, problems: list[str]) -> Iterator[str]:
    """The texts of one input, read through :mod:`megaevo.data.readers`: the string under json_key of each
    jsonl line or parquet / arrow row, or each line of a text file."""
    records = readers.iter_records(path)
    if readers.detect_format(path) in ("parquet", "arrow") or is_jsonl(path):
        for where, raw in records:
            if isinstance(raw, bytes):
                if not raw.strip():
                    continue
                try:
                    raw = json.loads(raw)
                except ValueError:
                    problems.append(f"{path}:{where}: invalid JSON")
                    continue
            text = raw.get(json_key) if isinstance(raw, dict) else None
            if not isinstance(text, str):
                problems.append(f"{path}:{where}: no string under key {json_key!r}")
                continue
            yield text
        return
    for where, raw in records:
        try:
            text = raw.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError:
            problems.append(f"{path}:{where}: not valid UTF-8")
            continue
        yield text.removesuffix("\r")


def _sample_sentences(inputs: list[Path], json_key: str, max_sentences: int, seed: int) -> list[str]:
    """A uniform sample (reservoir) of at most max_sentences training sentences over all inputs."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for path in inputs:
        problems: list[str] = []
        before = seen
        for text in _file_texts(path, json_key, problems):
            for sentence in split_text(text):
                seen += 1
                if len(reservoir) < max_sentences:
                    reservoir.append(sentence)
                else:
                    j = rng.randrange(seen)
                    if j < max_sentences:
                        reservoir[j] = sentence
        if seen == before:
            hint = f" (first problem: {problems[0]})" if problems else ""
            what = f"no string under key {json_key!r} on any line" if is_jsonl(path) else "no text"
            raise TokenizerError(f"{path}: {what}, nothing to train on{hint}")
        if problems:
            logger.warning("skipped %d unreadable lines in %s, first: %s", len(problems), path, problems[0])
    return reservoir


def _training_failure(error: str, vocab_size: int) -> str:
    """SentencePiece's reason for a failed training, with what to change in terms of `megaevo
    tokenizer train` (SentencePiece names its own options, which the command does not take)."""
    reason = error.rsplit("] ", 1)[-1].strip()
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", reason):
        return (f"the inputs are too small to learn {vocab_size:,} pieces (they give at most {int(m[2]):,}): "
                f"give more or larger --input files, or use --vocab-size {int(m[2])} or less")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", reason):
        need = int(m[2])
        return (f"the inputs use so many distinct characters that each needs a piece of its own, and with the "
                f"special and byte pieces that takes {need:,} ids: use --vocab-size {need} or more (in practice "
                f"far more, so that pieces longer than one character are learned)")
    return f"{reason} (try more or larger --input files, or a smaller --vocab-size)"


def _drain(items: list[str]) -> Iterator[str]:
    """Yield items from the end, releasing each one as SentencePiece copies it."""
    while items:
        yield items.pop()


def train_sentencepiece(
    inputs: list[str],
    vocab_size: int,
    output_prefix: str,
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    seed: int = 1234,
) -> Path:
    """Train a byte-fallback SentencePiece BPE model; write PREFIX.model and PREFIX.vocab; return the .model path.

    Inputs are text files (one line, one sentence) or jsonl (.gz, .zst), parquet or arrow files (the
    string under json_key; documents are cut into sentences of at most MAX_SENTENCE_BYTES). At most max_sentences
    sentences, sampled uniformly with seed, are used. Ids: unk 0, bos 1 `<s>`, eos 2 `</s>`,
    pad 3 `<pad>`, then CHAT_TOKENS. Normalisation is the identity, whitespace is kept as is and
    digits are split, so `decode(encode(text)) == text` for any text.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"a vocabulary of {vocab_size} is too small: 4 control pieces, {len(CHAT_TOKENS)} chat tokens and "
            f"256 byte-fallback pieces need {MIN_VOCAB_SIZE - 1} ids; use --vocab-size {MIN_VOCAB_SIZE} or more "
            f"(in practice far more)"
        )
    if max_sentences < 1:
        raise TokenizerError(f"max_sentences must be positive, got {max_sentences}")
    if not inputs:
        raise TokenizerError("train_sentencepiece needs at least one input file")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: tokenizer training input not found" + (" (it is a directory)" if p.is_dir() else ""))

    sentences = _sample_sentences(paths, json_key, max_sentences, seed)
    prefix = Path(str(output_prefix).removesuffix(".model"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    outputs = [(Path(f"{tmp}{ext}"), Path(f"{prefix}{ext}")) for ext in (".model", ".vocab")]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_drain(sentences),
            model_prefix=str(tmp),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            user_defined_symbols=list(CHAT_TOKENS),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
        for src, dst in outputs:
            os.replace(src, dst)
    except RuntimeError as e:
        raise TokenizerError(f"SentencePiece training for {prefix}.model failed (--vocab-size {vocab_size}): "
                             f"{_training_failure(str(e), vocab_size)}") from None
    finally:
        for src, _ in outputs:
            src.unlink(missing_ok=True)
    return outputs[0][1]
