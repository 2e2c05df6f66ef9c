"""A run's own copy of its tokenizer, and where a checkpoint's tokenizer is found.

A run copies `data.tokenizer` into ``OUT_DIR/tokenizer/`` when it starts (:func:`keep_tokenizer`),
under the names a tokenizer directory uses: ``tokenizer.model`` (SentencePiece) or ``tokenizer.json``
(Hugging Face, with the files beside it that describe it, e.g. ``tokenizer_config.json``). The run
directory is then self-contained: moved, or used from another folder, its checkpoints still find the
tokenizer they were trained with. (Copy the whole run directory to take a checkpoint along, or export
it with ``megaevo convert --to-hf``, which writes the tokenizer beside the weights.)

:func:`tokenizer_candidates` lists where a checkpoint's tokenizer may be, in order: the checkpoint
directory itself (an imported or resharded checkpoint carries its tokenizer files there), the run's
copy ``RUN/tokenizer`` for a checkpoint in ``RUN/checkpoints/``, and the path its config recorded
(``data.tokenizer``: absolute for runs that record absolute paths; an older relative one is taken
against the working directory). The copies come first: they are what the run trained with, even if
the file at the recorded path has changed since.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from megaevo.configio import ConfigError
from megaevo.errors import UserError
from megaevo.log import get_logger

logger = get_logger(__name__)

RUN_TOKENIZER_DIR = "tokenizer"  # OUT_DIR/tokenizer: the run's copy
MAIN_FILES = ("tokenizer.json", "tokenizer.model")
# The files of a Hugging Face tokenizer directory (those beside a tokenizer.json travel with it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class TokenizerNotFound(UserError):
    """No tokenizer where a model's tokenizer was looked for; the message lists the places tried."""


def tokenizer_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files that make up the tokenizer at ``path`` by the name each takes in a tokenizer directory:
    a directory's tokenizer files; a SentencePiece model as ``tokenizer.model``; a Hugging Face json as
    ``tokenizer.json`` with the tokenizer files beside it. Empty when there is no tokenizer there."""
    p = Path(path)
    if p.is_dir():
        if not any((p / name).is_file() for name in MAIN_FILES):
            return {}
        return {name: p / name for name in TOKENIZER_FILES if (p / name).is_file()}
    if not p.is_file():
        return {}
    if not _is_json(p):
        return {"tokenizer.model": p}
    beside = {name: p.parent / name for name in TOKENIZER_FILES
              if name not in MAIN_FILES and (p.parent / name).is_file()}
    return {**beside, "tokenizer.json": p}


def _is_json(path: Path) -> bool:
    if path.suffix in (".json", ".model"):
        return path.suffix == ".json"
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def keep_tokenizer(tokenizer: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path | None:
    """Copy the tokenizer at ``tokenizer`` (a run's `data.tokenizer`) into ``out_dir/tokenizer``,
    replacing an older copy that differs; the copy's directory, or None without a tokenizer (a
    `data.tokenizer` that names nothing gets a warning)."""
    if not tokenizer:
        return None
    files = tokenizer_files(tokenizer)
    dst = Path(out_dir) / RUN_TOKENIZER_DIR
    if not files:
        logger.warning(f"data.tokenizer {tokenizer}: no tokenizer there, so the run keeps no copy of it in {dst}")
        return None
    if dst.is_dir() and sorted(p.name for p in dst.iterdir()) == sorted(files) and all(
            _same_bytes(src, dst / name) for name, src in files.items()):
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, tmp / name)
    if dst.exists():
        logger.warning(f"data.tokenizer {tokenizer} differs from the run's copy in {dst}: replacing the copy")
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def _same_bytes(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def tokenizer_candidates(checkpoint: str | os.PathLike, recorded: str | None) -> list[Path]:
    """Where the tokenizer of the checkpoint directory ``checkpoint`` (an ``iter_`` directory) may be,
    in the order they are tried (see the module's doc); ``recorded`` is its config's `data.tokenizer`."""
    ck = Path(checkpoint)
    out = [ck]
    if ck.parent.name == "checkpoints":
        out.append(ck.parent.parent / RUN_TOKENIZER_DIR)
    if recorded:
        out.append(Path(recorded))
    return out


def find_tokenizer(candidates: list[Path]) -> dict[str, Path]:
    """The files of the first candidate that holds a tokenizer (empty if none does)."""
    for c in candidates:
        files = tokenizer_files(c)
        if files:
            return files
    return {}


def not_found_message(what: str, candidates: list[Path]) -> str:
    """One line: no tokenizer for ``what``, and the places tried."""
    tried = ", ".join(str(c.resolve()) for c in candidates)
    return f"no tokenizer found for {what} (tried {tried})"


def require_tokenizer(model, what: str):
    """``model.tokenizer``, or a :class:`TokenizerNotFound` saying that ``what`` needs it and where it
    was looked for (``model.tokenizer_error``, set by ``megaevo.load``)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        where = getattr(model, "tokenizer_error", None) or "none was loaded with the model"
        raise TokenizerNotFound(f"{what} needs the model's tokenizer: {where}")
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int, path) -> None:
    """A ConfigError when ``tokenizer`` (loaded from data.tokenizer ``path``) has more tokens than the
    model's vocabulary holds."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {path} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={vocab_size}")
