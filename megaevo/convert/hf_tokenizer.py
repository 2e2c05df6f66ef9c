"""Hugging Face tokenizer files for a SentencePiece model, written without ``protobuf``.

:func:`write_spm_tokenizer_files` turns a SentencePiece ``.model`` (megaevo trains BPE with byte
fallback, the identity normalization and no dummy prefix) into the files
``transformers.AutoTokenizer`` loads with neither ``sentencepiece`` nor ``protobuf`` installed:
``tokenizer.json`` (built with the ``tokenizers`` package), ``tokenizer_config.json`` and
``special_tokens_map.json``.

The ``tokenizer.json`` encodes as SentencePiece does:

- the model is BPE over the vocabulary in id order, with one merge for every way a piece splits into
  two mergeable pieces, ranked by the score of the piece it makes (SentencePiece merges the
  adjacent pair whose union scores highest), byte fallback and ``<unk>`` as SentencePiece has them;
- the normalizer follows the model's normalizer spec (character map, extra whitespace removal,
  dummy prefix, spaces written as ``▁``), and there is no pre-tokenizer: SentencePiece merges over
  the whole text;
- user-defined symbols (megaevo's chat markers) are added tokens, matched anywhere in the text and
  never split, as SentencePiece matches them;
- control pieces (``<s>``, ``</s>``, ``<pad>``) are plain vocabulary entries. SentencePiece never
  makes them from text (``"<s>"`` in a text is three characters), and neither does this BPE;
  ``tokenizer_config.json`` names them as special tokens with ``split_special_tokens: true`` so
  that transformers keeps treating their text as text.

The piece types and the normalizer and trainer settings are read from the model's bytes by a small
reader of the protocol-buffer wire format, cross-checked against ``SentencePieceProcessor``.
Before ``tokenizer.json`` is written its encodings and decodings are compared with
SentencePiece's on probe texts and on the vocabulary itself; a model it does not reproduce
(not BPE, a normalization it cannot express) gets no ``tokenizer.json`` and a warning, never one
that tokenizes differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from megaevo.data.tokenizers import load_tokenizer
from megaevo.log import get_logger

from .errors import ConvertError

logger = get_logger(__name__)

# SentencePiece piece types (ModelProto.SentencePiece.Type) and model types (TrainerSpec.ModelType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_SPACE = "\u2581"  # ▁, SentencePiece's visible space
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class UnsupportedTokenizer(ConvertError):
    """A SentencePiece model that tokenizer.json cannot reproduce."""


@dataclass(frozen=True)
class SpmModel:
    """What a SentencePiece model holds that tokenizer.json needs."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    normalizer_name: str
    charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def piece(self, i: int | None) -> str | None:
        return None if i is None else self.pieces[i]


# ------------------------------------------------------------------------------------------------ reading


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """``(field number, value)`` of one protocol-buffer message: an int or the raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated message")
        yield key >> 3, value


def read_spm(proto: bytes, sp=None) -> SpmModel:
    """Read a serialized SentencePiece model (``sp``, its processor, is made when not given)."""
    import sentencepiece as spm

    sp = sp or spm.SentencePieceProcessor(model_proto=proto)
    types: list[int] = []
    trainer, normalizer = {}, {}
    try:
        for field, value in _fields(proto):
            if field == 1:  # pieces
                kind = NORMAL
                for f, v in _fields(value):
                    if f == 3:
                        kind = v
                types.append(kind)
            elif field == 2:  # trainer_spec
                trainer.update(_fields(value))
            elif field == 3:  # normalizer_spec
                normalizer.update(_fields(value))
    except ValueError as e:
        raise UnsupportedTokenizer(f"unreadable model ({e})") from None
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    expected = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                else UNUSED if sp.is_unused(i) else None for i in range(n)]
    if len(types) != n or any(e is not None and t != e or e is None and t not in (NORMAL, USER_DEFINED)
                              for t, e in zip(types, expected)):
        raise UnsupportedTokenizer("the piece table read from the model disagrees with sentencepiece's")

    def flag(spec: dict, field: int, default: bool) -> bool:
        return bool(spec[field]) if field in spec else default

    def opt(i: int) -> int | None:
        return i if 0 <= i < n else None

    return SpmModel(
        pieces=pieces, scores=[sp.get_score(i) for i in range(n)], types=types,
        model_type=trainer.get(3, 1), byte_fallback=flag(trainer, 35, False),
        treat_whitespace_as_suffix=flag(trainer, 24, False),
        normalizer_name=bytes(normalizer.get(1, b"")).decode("utf-8", "replace"),
        charsmap=bytes(normalizer.get(2, b"")), add_dummy_prefix=flag(normalizer, 3, True),
        remove_extra_whitespaces=flag(normalizer, 4, True), escape_whitespaces=flag(normalizer, 5, True),
        unk_id=opt(sp.unk_id()), bos_id=opt(sp.bos_id()), eos_id=opt(sp.eos_id()), pad_id=opt(sp.pad_id()))


# ------------------------------------------------------------------------------------------------ building


def bpe_merges(model: SpmModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged piece first."""
    mergeable = {p for p, t in zip(model.pieces, model.types) if t == NORMAL}
    ranked = []
    for i, (piece, kind) in enumerate(zip(model.pieces, model.types)):
        if kind != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-model.scores[i], i, k, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(model: SpmModel):
    """A ``tokenizers.Tokenizer`` that encodes as the SentencePiece model does (see the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    kind = MODEL_TYPES.get(model.model_type, str(model.model_type))
    if kind != "bpe":
        raise UnsupportedTokenizer(f"a {kind} model (tokenizer.json is written for BPE models)")
    if model.treat_whitespace_as_suffix:
        raise UnsupportedTokenizer("treat_whitespace_as_suffix is set")
    if not model.escape_whitespaces:
        raise UnsupportedTokenizer("escape_whitespaces is off")
    vocab = {p: i for i, p in enumerate(model.pieces)}
    tok = Tokenizer(models.BPE(vocab, bpe_merges(model), unk_token=model.piece(model.unk_id), fuse_unk=True,
                               byte_fallback=model.byte_fallback))
    steps = []
    if model.charsmap:
        steps.append(normalizers.Precompiled(model.charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    steps.append(normalizers.Replace(" ", _SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if model.add_dummy_prefix else []))
    user = [p for p, t in zip(model.pieces, model.types) if t == USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    for p in user:
        if tok.token_to_id(p) != vocab[p]:
            raise UnsupportedTokenizer(f"user-defined symbol {p!r} did not keep its id {vocab[p]}")
    return tok


# ------------------------------------------------------------------------------------------------ checking


def probe_texts(model: SpmModel) -> list[str]:
    """Texts the exported tokenizer must encode exactly as SentencePiece does."""
    texts = [
        "", " ", "  ", "\n", "\t", "\r\n", "a", " a", "a ", "  a  ", "Hello world.",
        "The quick brown fox jumps over the lazy dog. THE END!",
        "  leading and trailing spaces  ", "multiple   spaces\t\ttabs\n\nnewlines \n \n end",
        "def f(x):\n    return x * 12345\n\n\tif a  ==  b:\n\t\tpass  # comment\n",
        "for i in range(10):\n        print(f\"{i:>4}\")\n",
        "3.14159 2024-06-01 1,000,000 0x1F 007 -42e+10",
        "Grüße, naïve café — déjà vu. Ærøskøbing, Łódź, Ŝtelo",
        "東京は日本の首都です。 中文字符 한국어 日本語テキスト",
        "emoji 😀👍🏽 🇫🇷 👩‍👩‍👧 ✓ ★",
        "\u00a0no-break\u2003em space\u3000ideographic\u200bzero width",
        "ﬁ ligature Ｆｕｌｌｗｉｄｔｈ ①②③ ＡＢＣ",
        "e\u0301 combining vs é precomposed",
        "<s>literal</s> <pad> <unk> <0x41> ▁ ▁▁x",
        "a" * 80, " " * 33, "\n" * 5 + "x" + "\t" * 3,
        "mixed\ttabs and    spaces\r\nwindows lines\r\n",
        "\x00\x01\x1b[0m control characters\x7f",
    ]
    user = [p for p, t in zip(model.pieces, model.types) if t == USER_DEFINED]
    if user:
        texts += ["".join(user), " ".join(user), f"{user[0]}text", f"x{user[-1]}\n",
                  "\n".join(f"{u} hello {u}world{u}" for u in user)]
    # Every normal piece as text, a few dozen per line: exercises the merges of the whole vocabulary.
    words = [p.replace(_SPACE, " ") for p, t in zip(model.pieces, model.types) if t == NORMAL]
    texts += ["".join(words[i:i + 32]) for i in range(0, len(words), 32)]
    texts += [" ".join(words[i:i + 32]) for i in range(0, len(words), 32)]
    return texts


def first_mismatch(tok, sp, texts: list[str]) -> str | None:
    """The first text the two tokenizers encode or decode differently, with both results; None when none."""
    unk = sp.unk_id() if sp.unk_id() >= 0 else None
    for text in texts:
        want, got = sp.encode(text), tok.encode(text, add_special_tokens=False).ids
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return (f"{text[:60]!r} encodes as [..., {', '.join(map(str, got[at:at + 6]))}, ...] instead of "
                    f"[..., {', '.join(map(str, want[at:at + 6]))}, ...] from token {at}")
        if unk is not None and unk in want:
            continue  # SentencePiece decodes <unk> as " ⁇ ", tokenizers as "<unk>"; both mean the same
        want_text, got_text = sp.decode(want), tok.decode(want, skip_special_tokens=False)
        if got_text != want_text:
            return f"{text[:60]!r} decodes as {got_text[:60]!r} instead of {want_text[:60]!r}"
    return None


# ------------------------------------------------------------------------------------------------ writing


def write_spm_tokenizer_files(dst: Path, model_path: Path, model_max_length: int | None = None) -> list[str]:
    """Write tokenizer.json (when it can be built and checked), tokenizer_config.json and
    special_tokens_map.json for the SentencePiece model ``model_path`` into ``dst``; their names."""
    try:
        import sentencepiece as spm

        proto = Path(model_path).read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (ImportError, OSError, RuntimeError) as e:
        logger.warning("no Hugging Face tokenizer files written for %s: it could not be read as a SentencePiece "
                       "model (%s)", model_path, str(e).strip() or type(e).__name__)
        return []
    written = []
    fast, model = False, None
    try:
        model = read_spm(proto, sp)
        tok = build_tokenizer(model)
        problem = first_mismatch(tok, sp, probe_texts(model))
        if problem:
            raise UnsupportedTokenizer(f"it would not tokenize as the model does: {problem}")
    except ImportError:
        logger.warning("no tokenizer.json written for %s: building it needs the tokenizers package "
                       "(pip install tokenizers); transformers then needs sentencepiece and protobuf to load "
                       "the tokenizer", model_path)
    except UnsupportedTokenizer as e:
        logger.warning("no tokenizer.json written for %s: %s; transformers then needs sentencepiece and "
                       "protobuf to load the tokenizer", model_path, e)
    else:
        tok.save(str(dst / "tokenizer.json"))
        written.append("tokenizer.json")
        fast = True

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    specials = {k: v for k, v in zip(_SPECIAL_KEYS, (piece(sp.bos_id()), piece(sp.eos_id()), piece(sp.unk_id()),
                                                      piece(sp.pad_id()))) if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer", **specials,
              "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False}
    if not fast:  # transformers' slow Llama tokenizer then hands the text to sentencepiece as it is
        config.update(legacy=True, add_prefix_space=model.add_dummy_prefix if model is not None else False)
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    _write_json(dst / "tokenizer_config.json", config)
    _write_json(dst / "special_tokens_map.json", specials)
    return written + ["tokenizer_config.json", "special_tokens_map.json"]


def special_token_ids(directory: Path) -> dict[str, int]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the tokenizer in ``directory`` (those it has)."""
    try:
        tok = load_tokenizer(directory)
    except (ImportError, OSError, ValueError) as e:
        logger.warning("no token ids for config.json: the exported tokenizer could not be read (%s)", e)
        return {}
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v is not None}


def generation_config(config: dict) -> dict | None:
    """``generation_config.json`` holding the token ids of ``config`` (a config.json), or None without ids."""
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    if not ids:
        return None
    out = {"_from_model_config": True, **ids}
    try:
        out["transformers_version"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        pass
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["SpmModel", "UnsupportedTokenizer", "bpe_merges", "build_tokenizer", "first_mismatch",
           "generation_config", "probe_texts", "read_spm", "special_token_ids", "write_spm_tokenizer_files"]
