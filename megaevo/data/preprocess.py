"""Tokenize documents into an indexed dataset (`prefix.bin` + `prefix.idx`) with a worker pool.

Inputs are read by :mod:`megaevo.data.readers` (jsonl, .jsonl.gz, .jsonl.zst, parquet, arrow and
Hugging Face dataset folders, directories and globs). The main process reads records and writes tokens;
workers parse JSON and tokenize chunks of records. Results are consumed in input order, so the output is
the same for any number of workers, and the same texts give the same bytes whatever container holds
them. With ``shard=(i, n)`` the job reads only the i-th of n contiguous runs of the inputs' pieces (see
:func:`megaevo.data.readers.shard_pieces`); ``megaevo merge`` of the n outputs in order equals the
unsharded job's output. The dataset appears under its final name only when every input has been read
without error.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from megaevo.data import readers
from megaevo.data.indexed import IndexedDatasetWriter, token_dtype
from megaevo.data.tokenizers import Tokenizer, load_tokenizer
from megaevo.errors import UserError
from megaevo.log import get_logger

logger = get_logger(__name__)

CHUNK_LINES = 512
MAX_LOCATIONS = 10  # skipped-line locations kept in the summary
MAX_WARNINGS = 5  # skipped-line locations logged as they happen


class PreprocessError(UserError):
    """An input is missing, unreadable or malformed."""


@contextlib.contextmanager
def _input_errors():
    """A reader's InputError as a PreprocessError (same message)."""
    try:
        yield
    except readers.InputError as e:
        raise PreprocessError(str(e)) from None


def parse_shard(spec) -> tuple[int, int] | None:
    """``"I/N"`` (I from 0 to N-1) as (I, N); None stays None."""
    if spec is None or isinstance(spec, tuple):
        return spec
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise PreprocessError(f"--shard {spec!r}: expected I/N, e.g. 0/8 (shards numbered from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise PreprocessError(f"--shard {spec}: I must be in 0..N-1 and N at least 1")
    return i, n


@dataclasses.dataclass
class PreprocessSummary:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    documents: int
    tokens: int
    skipped: int
    skipped_locations: list[str]
    empty: int  # documents whose text encodes to no tokens (kept, with no sequence; counted in documents)
    seconds: float
    docs_per_s: float
    tokens_per_s: float
    dtype: str
    workers: int
    shard: str | None = None  # "I/N" for a sharded job

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        part = f", shard {self.shard}" if self.shard else ""
        lines = [
            f"wrote {self.output_prefix}.bin/.idx ({self.dtype}) from {len(self.inputs)} input(s){part}",
            f"  documents  {self.documents:,}",
            f"  tokens     {self.tokens:,}",
            f"  time       {self.seconds:.2f} s with {self.workers} worker(s): "
            f"{self.docs_per_s:,.0f} docs/s, {self.tokens_per_s:,.0f} tokens/s",
        ]
        if self.empty:
            lines.append(f"  empty      {self.empty:,} documents with no tokens (kept in the document index "
                         f"with no sequence, as Megatron-LM keeps them)")
        if self.skipped:
            lines.append(f"  skipped    {self.skipped:,} malformed lines, first: {self.skipped_locations[0]}")
        return "\n".join(lines)


def check_inputs(inputs) -> list[Path]:
    """The input files (directories and globs expanded, see :mod:`megaevo.data.readers`), after checking
    that each is readable."""
    with _input_errors():
        paths = readers.expand_inputs(inputs)
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            raise PreprocessError(f"{p}: cannot read ({e.strerror or e})") from None
    return paths


def plan_inputs(inputs, column: str | None = None, shard: tuple[int, int] | None = None
                ) -> tuple[list[Path], list[readers.Piece]]:
    """The input files and the pieces this job reads (all of them, or one shard's run), each checked for
    a corrupt or truncated container and a missing ``column`` before any work."""
    paths = check_inputs(inputs)
    with _input_errors():
        pieces = [piece for p in paths for piece in readers.pieces_of(p)]
        if shard is not None:
            pieces = readers.shard_pieces(pieces, *shard)
        for piece in pieces:
            readers.check_piece(piece, column)
    return paths, pieces


# -- encoding (runs in workers) ------------------------------------------------------------------

@dataclasses.dataclass
class _Encoded:
    tokens: np.ndarray  # all documents of a chunk back to back
    lengths: list[int]  # tokens per document; 0 for a document that encodes to no tokens
    errors: list[tuple[int, str]]  # (line offset in the chunk, reason)
    empty: int


def _text_of(raw, json_key: str) -> str:
    """The document text of one jsonl line (bytes) or column value (str or None), or ValueError with the
    reason it is malformed."""
    if raw is None:
        raise ValueError(f"{json_key!r} is null")
    if isinstance(raw, str):
        return raw
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if json_key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise ValueError(f"key {json_key!r} missing (keys: {keys or 'none'})")
    text = obj[json_key]
    if not isinstance(text, str):
        raise ValueError(f"{json_key!r} is {type(text).__name__}, not a string")
    return text


def encode_lines(tokenizer: Tokenizer, lines: list, json_key: str, eod: int | None, dtype) -> _Encoded:
    """Tokenize the documents of a chunk of jsonl lines or column values; blank lines are ignored."""
    docs, lengths, errors, empty = [], [], [], 0
    for i, raw in enumerate(lines):
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            text = _text_of(raw, json_key)
        except ValueError as e:
            errors.append((i, str(e)))
            continue
        ids = tokenizer.encode(text)
        if not ids:  # a document with no sequence (and no end-of-document token), as in Megatron-LM
            empty += 1
            lengths.append(0)
            continue
        if eod is not None:
            ids.append(eod)
        docs.extend(ids)
        lengths.append(len(ids))
    tokens = np.array(docs, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise PreprocessError(f"{tokenizer.name} produced token id {int(tokens.max())} outside its vocabulary ({tokenizer.vocab_size})")
    return _Encoded(tokens.astype(dtype), lengths, errors, empty)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer) -> None:
    """Load the tokenizer once per worker; interrupts are handled by the main process."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer(tokenizer)


def _encode_in_worker(task):
    """(encode function, lines, *arguments): the function's result on this worker's tokenizer."""
    encode, *args = task
    return encode(_worker_tokenizer, *args)


# -- reading and ordering ------------------------------------------------------------------------

def _read_chunks(pieces: list[readers.Piece], column: str | None) -> Iterator[readers.Chunk]:
    """The chunks of each piece in turn (records: jsonl lines, or ``column``'s values; whole rows if None)."""
    for piece in pieces:
        yield from readers.read_chunks(piece, column, CHUNK_LINES)


def _encoded_chunks(chunks, encode_args, tokenizer: Tokenizer, pool, window: int, encode=encode_lines):
    """(chunk, encode(tokenizer, chunk.records, *encode_args)) in input order, at most `window` chunks in
    flight; `encode` is a module-level function (workers receive it by reference)."""
    if pool is None:
        for chunk in chunks:
            yield chunk, encode(tokenizer, chunk.records, *encode_args)
        return
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_encode_in_worker, ((encode, chunk.records, *encode_args),))))
        if len(pending) >= window:
            chunk, result = pending.popleft()
            yield chunk, result.get()
    while pending:
        chunk, result = pending.popleft()
        yield chunk, result.get()


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(desc="preprocess", unit=" docs", file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True)


def missing_dirs(path: Path) -> list[Path]:
    """The directories on the way to path that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_new_dirs(new_dirs: list[Path]) -> None:
    """Remove the directories a failed job created (deepest first), stopping at one that is not empty."""
    for d in new_dirs:
        try:
            d.rmdir()
        except OSError:
            break


@dataclasses.dataclass
class JobReport:
    skipped: int
    locations: list[str]


def encode_inputs(pieces: list[readers.Piece], tokenizer, tok: Tokenizer, encode_args: tuple, *, workers: int,
                  on_error: str, progress: bool, consume, encode=encode_lines, column: str | None = None) -> JobReport:
    """Encode the input pieces chunk by chunk (in a pool of ``workers`` processes when more than one) and
    hand each chunk's result, in input order, to ``consume(enc, bar)``, which writes it and updates the
    progress bar. A malformed line raises PreprocessError naming file and line (``on_error="fail"``) or
    is counted and its place kept (``"skip"``). ``column`` picks a parquet/arrow column (None: whole rows).
    The pool is torn down however the job ends."""
    skipped, locations = 0, []
    pool = bar = None
    try:
        if workers > 1:  # before the progress bar starts its thread, so that workers fork a single thread
            spec = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok
            pool = multiprocessing.get_context().Pool(workers, _init_worker, (spec,))
        bar = _progress_bar(progress)
        chunks = _read_chunks(pieces, column)
        with _input_errors():
            for chunk, enc in _encoded_chunks(chunks, encode_args, tok, pool, 4 * workers, encode):
                for offset, reason in enc.errors:
                    where = f"{chunk.path}:{chunk.where(offset)}: {reason}"
                    if on_error == "fail":
                        raise PreprocessError(f"{where} (use --on-error skip to skip malformed lines and count them; "
                                              f"on_error='skip' in Python)")
                    skipped += 1
                    if len(locations) < MAX_LOCATIONS:
                        locations.append(where)
                    if skipped <= MAX_WARNINGS:
                        with bar.external_write_mode(file=sys.stderr):  # the line goes above the progress bar
                            logger.warning("skipping %s", where)
                consume(enc, bar)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    if skipped > MAX_WARNINGS:
        logger.warning("skipped %d malformed lines in all (first %d in the summary)", skipped, len(locations))
    return JobReport(skipped, locations)


# -- the job -------------------------------------------------------------------------------------

def preprocess(
    inputs,
    output_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    on_error: str = "fail",
    progress: bool = True,
    shard: tuple[int, int] | str | None = None,
) -> PreprocessSummary:
    """Tokenize the string under json_key (a jsonl key, or a parquet/arrow column) of every record of the
    inputs, in order, into output_prefix; with ``shard=(i, n)`` (or ``"i/n"``) only the i-th of n runs.

    One sequence per document (plus the end-of-document token when append_eod). Blank lines are
    ignored. A document that encodes to no tokens is kept as Megatron-LM keeps it: an entry of the
    document index with no sequence (and no end-of-document token), counted in `documents` and in
    `empty`. A malformed line raises PreprocessError naming file and line (on_error="fail", nothing
    is written) or is skipped and counted (on_error="skip"; `--on-error skip` on the command line).
    """
    if on_error not in ("fail", "skip"):
        raise PreprocessError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if workers < 1:
        raise PreprocessError(f"workers (--workers) must be at least 1, got {workers}")
    shard = parse_shard(shard)
    paths, pieces = plan_inputs(inputs, json_key, shard)
    tok = load_tokenizer(tokenizer)
    eod = None
    if append_eod:
        eod = tok.eod_id
        if eod is None:
            raise PreprocessError(f"{tok.name} has no end-of-document (eos) token, so it cannot be appended")
    dtype = token_dtype(tok.vocab_size)
    encode_args = (json_key, eod, dtype)
    new_dirs = missing_dirs(Path(output_prefix).parent)

    start = time.perf_counter()
    documents = empty = 0
    writer = IndexedDatasetWriter(output_prefix, dtype)

    def consume(enc: _Encoded, bar) -> None:
        nonlocal documents, empty
        pos = 0
        for n in enc.lengths:
            if n:
                writer.add_document(enc.tokens[pos : pos + n])
            else:
                writer.end_document()
            pos += n
        documents += len(enc.lengths)
        empty += enc.empty
        bar.update(len(enc.lengths))
        elapsed = max(time.perf_counter() - start, 1e-9)
        speed = f"{writer.num_tokens / elapsed:,.0f} tokens/s"
        bar.set_postfix_str(speed + (f", {empty:,} empty" if empty else ""), refresh=False)

    try:
        report = encode_inputs(pieces, tokenizer, tok, encode_args, workers=workers, on_error=on_error,
                               progress=progress, consume=consume, column=json_key)
        writer.finalize()
    except BaseException:
        writer.abort()
        remove_new_dirs(new_dirs)
        raise
    skipped, locations = report.skipped, report.locations

    seconds = time.perf_counter() - start
    rate = 1.0 / max(seconds, 1e-9)
    return PreprocessSummary(
        inputs=[str(p) for p in paths],
        output_prefix=str(writer.idx_path)[: -len(".idx")],
        tokenizer=tok.name,
        documents=documents,
        tokens=writer.num_tokens,
        skipped=skipped,
        skipped_locations=locations,
        empty=empty,
        seconds=round(seconds, 4),
        docs_per_s=round(documents * rate, 1),
        tokens_per_s=round(writer.num_tokens * rate, 1),
        dtype=str(dtype),
        workers=workers,
        shard=f"{shard[0]}/{shard[1]}" if shard else None,
    )
