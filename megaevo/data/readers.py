"""Readers for corpora and conversation sets as they are kept: jsonl, gzip and zstd jsonl, parquet and
Hugging Face dataset folders. One layer used by ``megaevo preprocess`` (text and ``--sft``), evaluation
sets and RL prompts.

**Formats** (recognised by their magic bytes, else by their name):

- ``jsonl``: one JSON object a line; ``.jsonl.gz`` (gzip); ``.jsonl.zst`` / ``.zst`` (zstd, several
  frames allowed; needs the ``zstandard`` package: ``pip install 'megaevo[zstd]'``);
- ``parquet``: read one row group at a time in batches of :data:`BATCH_ROWS` rows, only the columns asked
  for, so memory stays bounded whatever the file's size (needs ``pyarrow``: ``pip install 'megaevo[parquet]'``);
- ``arrow``: Arrow IPC stream or file, as ``datasets.Dataset.save_to_disk`` writes (``data-*.arrow``),
  read batch by batch through a memory map (needs ``pyarrow``).

**Inputs** may be files, directories or glob patterns, expanded in this order: the inputs as given; a
glob's matches sorted by path; a ``save_to_disk`` folder (it has ``state.json``) its arrow files in the
order ``state.json`` lists them; any other directory every file under it with a known suffix
(``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.zst``, ``.parquet``, ``.arrow``), sorted by their path
relative to it (a hub snapshot's ``data/train-00000-of-00004.parquet`` ... in shard order), hidden files
and folders skipped. A folder written by ``DatasetDict.save_to_disk`` (``dataset_dict.json``) is refused
with the split folders to choose from.

**Records and where they are**: jsonl yields each line's raw bytes (the caller parses them), located as
``file:LINE`` (from 1); parquet yields a column's values (strings) or whole rows (dicts), located as
``file:row group G, row R`` (both from 0, as pyarrow counts them); arrow as ``file:row R`` (from 0, the
dataset's index).

**Pieces** (for ``--shard I/N``): an input is cut into pieces in a fixed order, a plain jsonl file into
byte ranges of :data:`PIECE_BYTES` (each line belongs to the range its first byte is in), a parquet file
into its row groups, a compressed or arrow file kept whole. A shard is a contiguous run of pieces
(:func:`shard_pieces`), so the shards' outputs concatenated in shard order are the whole job's output.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

from megaevo.data import DataError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
KNOWN_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".zst", ".parquet", ".arrow")
READ_BYTES = 1 << 20
BATCH_ROWS = 512
PIECE_BYTES = 64 << 20  # byte range of a plain jsonl file that one shard may take


class InputError(DataError):
    """An input is missing, unreadable, truncated, or lacks the column asked for."""


def _need(module: str, extra: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the optional package {module!r}, which is not installed: "
                          f"pip install 'megaevo[{extra}]'") from None


def _pyarrow(what: str):
    _need("pyarrow", "parquet", what)
    import pyarrow
    import pyarrow.ipc  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    return pyarrow


# -- expanding inputs ----------------------------------------------------------------------------

def _known(path: Path) -> bool:
    return any(path.name.endswith(s) for s in KNOWN_SUFFIXES)


def _hf_folder(d: Path) -> list[Path]:
    """The arrow files of a ``save_to_disk`` folder, in the order its ``state.json`` lists them."""
    state = d / "state.json"
    try:
        files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{state}: not a datasets state.json with _data_files ({e})") from None
    out = []
    for name in files:
        p = d / name
        if not p.is_file():
            raise InputError(f"{p}: listed in {state} but not found (an incomplete copy of the dataset folder?)")
        out.append(p)
    return out


def _expand_dir(d: Path) -> list[Path]:
    if (d / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in d.iterdir() if (p / "state.json").is_file())
        folders = ", ".join(str(d / s) for s in splits)
        raise InputError(f"{d}: a DatasetDict folder; give one split's folder ({folders})")
    if (d / "state.json").is_file():
        return _hf_folder(d)
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and _known(Path(f))]
    if not found:
        raise InputError(f"{d}: no input files in the directory (looked for {', '.join(KNOWN_SUFFIXES)})")
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


def expand_inputs(inputs) -> list[Path]:
    """The input files of files, directories and glob patterns, in the order described in the module doc."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if not p.exists() and glob.has_magic(str(spec)):
            matches = sorted(glob.glob(str(spec), recursive=True))
            if not matches:
                raise InputError(f"{spec}: no file matches the pattern")
            for m in matches:
                out += _expand_dir(Path(m)) if Path(m).is_dir() else [Path(m)]
        elif p.is_dir():
            out += _expand_dir(p)
        elif not p.exists():
            raise InputError(f"{p}: input file not found")
        elif not p.is_file():
            raise InputError(f"{p}: not a file")
        else:
            out.append(p)
    if not out:
        raise InputError("no input files given")
    return out


def detect_format(path: Path) -> str:
    """``jsonl``, ``gzip``, ``zstd``, ``parquet`` or ``arrow``, by magic bytes (else the name)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic.startswith(ZSTD_MAGIC):
        return "zstd"
    if magic.startswith(PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(ARROW_FILE_MAGIC) or magic.startswith(ARROW_STREAM_MAGIC):
        return "arrow"
    name = path.name
    for suffix, fmt in ((".gz", "gzip"), (".zst", "zstd"), (".parquet", "parquet"), (".arrow", "arrow")):
        if name.endswith(suffix):
            kind = {"gzip": "gzip-compressed", "zstd": "zstd-compressed"}.get(fmt, f"a {fmt} file")
            raise InputError(f"{path}: named {suffix} but not {kind} (empty or corrupt?)")
    return "jsonl"


# -- pieces --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of an input: a plain jsonl byte range [start, stop), a parquet row group, or a whole file."""
    path: Path
    format: str
    weight: int  # bytes, for balancing shards
    start: int = 0
    stop: int | None = None
    row_group: int | None = None


def _parquet_file(path: Path):
    pa = _pyarrow("parquet files")
    try:
        return pa.parquet.ParquetFile(str(path), memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file (truncated or corrupt: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def pieces_of(path: Path) -> list[Piece]:
    fmt = detect_format(path)
    size = path.stat().st_size
    if fmt == "jsonl" and size > PIECE_BYTES:
        return [Piece(path, fmt, min(PIECE_BYTES, size - a), a, min(a + PIECE_BYTES, size))
                for a in range(0, size, PIECE_BYTES)]
    if fmt == "parquet":
        meta = _parquet_file(path).metadata
        return [Piece(path, fmt, max(1, meta.row_group(g).total_byte_size), row_group=g)
                for g in range(meta.num_row_groups)]
    return [Piece(path, fmt, max(1, size))]


def shard_pieces(pieces: list[Piece], shard: int, shards: int) -> list[Piece]:
    """Shard ``shard`` (from 0) of ``shards``: the pieces whose weight midpoint falls in its 1/N of the
    total weight. Contiguous, disjoint, covering every piece once over all shards."""
    if not 0 <= shard < shards:
        raise InputError(f"shard {shard} out of range for {shards} shards")
    total = sum(p.weight for p in pieces)
    out, before = [], 0
    for p in pieces:
        mid2 = 2 * before + p.weight  # twice the midpoint, to stay in integers
        if shard * 2 * total <= mid2 * shards < (shard + 1) * 2 * total:
            out.append(p)
        before += p.weight
    return out


# -- reading -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Chunk:
    """Consecutive records of one input: raw jsonl lines (bytes) or columnar values (str, dict or None)."""
    path: Path
    records: list
    where: Callable[[int], str]  # the location of records[i], e.g. "12" (a line) or "row group 0, row 3"


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for line in parts:
            yield line + b"\n"
    if rest:
        yield rest


def _zstd_blocks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of every frame; a frame cut short is an InputError (zstandard alone stops quietly)."""
    zstd = _need("zstandard", "zstd", "zstd-compressed files")
    dctx = zstd.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while buf := f.read(READ_BYTES):
            while buf:
                try:
                    out = obj.decompress(buf)
                except zstd.ZstdError as e:
                    raise InputError(f"{path}: corrupt zstd data ({e})") from None
                fed = True
                if out:
                    yield out
                if obj.eof:
                    buf, obj, fed = obj.unused_data, dctx.decompressobj(), False
                else:
                    buf = b""
    if fed:
        raise InputError(f"{path}: truncated zstd file (the last frame ends early); download it again")


def _file_blocks(f, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    f.seek(start)
    pos = start
    while stop is None or pos < stop:
        block = f.read(READ_BYTES)
        if not block:
            return
        pos += len(block)
        yield block


class _LineBase:
    """Line number of a byte range's first line, counted only when a location is asked for."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset, self._n = path, offset, None

    def __call__(self) -> int:
        if self._n is None:
            n, remaining = 0, self.offset
            with open(self.path, "rb") as f:
                while remaining > 0 and (block := f.read(min(READ_BYTES, remaining))):
                    n += block.count(b"\n")
                    remaining -= len(block)
            self._n = n
        return self._n


def _jsonl_lines(piece: Piece) -> tuple[Iterator[bytes], _LineBase | None]:
    path = piece.path
    if piece.format == "gzip":
        def blocks():
            with gzip.open(path, "rb") as f:
                while block := f.read(READ_BYTES):
                    yield block
        return _lines(blocks()), None
    if piece.format == "zstd":
        return _lines(_zstd_blocks(path)), None
    if piece.stop is None:
        def whole():
            with open(path, "rb") as f:
                yield from _lines(_file_blocks(f))
        return whole(), None
    # A byte range: the lines whose first byte is in [start, stop).
    start, stop = piece.start, piece.stop
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under way belongs to the range before
            start = f.tell()
    base = _LineBase(path, start)

    def ranged():
        pos = start
        with open(path, "rb") as f:
            f.seek(start)
            for line in _lines(_file_blocks(f, start)):
                if pos >= stop:
                    return
                pos += len(line)
                yield line
    return ranged(), base


def _jsonl_chunks(piece: Piece, chunk_lines: int) -> Iterator[Chunk]:
    lines, base = _jsonl_lines(piece)
    first, lineno, batch, size = 1, 0, [], 0
    try:
        for lineno, line in enumerate(lines, 1):
            batch.append(line)
            size += len(line)
            if len(batch) >= chunk_lines or size >= READ_BYTES:
                yield Chunk(piece.path, batch, _line_where(first, base))
                batch, first, size = [], lineno + 1, 0
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{piece.path}: read failed after line {lineno}: {e}") from None
    if batch:
        yield Chunk(piece.path, batch, _line_where(first, base))


def _line_where(first: int, base: _LineBase | None) -> Callable[[int], str]:
    return lambda i: str(first + i + (base() if base is not None else 0))


def _column_type_error(path: Path, column: str, schema) -> str | None:
    import pyarrow as pa

    t = schema.field(column).type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return None
    return f"{path}: column {column!r} is {t}, not a string column"


def check_columns(path: Path, schema, columns: list[str] | None) -> None:
    if not columns:
        return
    names = list(schema.names)
    for c in columns:
        if c not in names:
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise InputError(f"{path}: no column {c!r} (columns: {shown or 'none'})")


def _batches_to_records(batch, column: str | None) -> list:
    if column is not None:
        return batch.column(0).to_pylist()
    return batch.to_pylist()


def _parquet_chunks(piece: Piece, column: str | None, columns: list[str] | None, rows: int) -> Iterator[Chunk]:
    pa = _pyarrow("parquet files")
    pf = _parquet_file(piece.path)
    check_columns(piece.path, pf.schema_arrow, [column] if column else columns)
    if column is not None and (err := _column_type_error(piece.path, column, pf.schema_arrow)):
        raise InputError(err)
    g = piece.row_group
    groups = [g] if g is not None else range(pf.metadata.num_row_groups)
    for group in groups:
        at = 0
        try:
            for batch in pf.iter_batches(batch_size=rows, row_groups=[group], columns=[column] if column else columns):
                records = _batches_to_records(batch, column)
                yield Chunk(piece.path, records, lambda i, g=group, a=at: f"row group {g}, row {a + i}")
                at += len(records)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{piece.path}: row group {group} unreadable after row {at} (truncated or corrupt: "
                             f"{_first_line(e)})") from None


def _arrow_reader(path: Path):
    pa = _pyarrow("arrow files")
    try:
        source = pa.memory_map(str(path))
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == ARROW_FILE_MAGIC:
            r = pa.ipc.open_file(source)
            return r.schema, (r.get_batch(i) for i in range(r.num_record_batches))
        r = pa.ipc.open_stream(source)
        return r.schema, iter(r)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable arrow file (truncated or corrupt: {_first_line(e)})") from None


def _arrow_chunks(piece: Piece, column: str | None, columns: list[str] | None, rows: int) -> Iterator[Chunk]:
    pa = _pyarrow("arrow files")
    schema, batches = _arrow_reader(piece.path)
    check_columns(piece.path, schema, [column] if column else columns)
    if column is not None and (err := _column_type_error(piece.path, column, schema)):
        raise InputError(err)
    at = 0
    try:
        for batch in batches:
            if column is not None:
                batch = batch.select([column])
            elif columns:
                batch = batch.select(columns)
            for s in range(0, batch.num_rows, rows):
                records = _batches_to_records(batch.slice(s, rows), column)
                yield Chunk(piece.path, records, lambda i, a=at: f"row {a + i}")
                at += len(records)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{piece.path}: unreadable after row {at} (truncated or corrupt: {_first_line(e)})") from None


def check_piece(piece: Piece, column: str | None = None) -> None:
    """Open a piece's file enough to find a corrupt or truncated file and a missing column before any work."""
    if piece.format == "parquet":
        pf = _parquet_file(piece.path)
        check_columns(piece.path, pf.schema_arrow, [column] if column else None)
        if column is not None and (err := _column_type_error(piece.path, column, pf.schema_arrow)):
            raise InputError(err)
    elif piece.format == "arrow":
        schema, _ = _arrow_reader(piece.path)
        check_columns(piece.path, schema, [column] if column else None)
        if column is not None and (err := _column_type_error(piece.path, column, schema)):
            raise InputError(err)
    elif piece.format == "zstd":
        _need("zstandard", "zstd", "zstd-compressed files")


def read_chunks(piece: Piece, column: str | None = None, chunk_rows: int = BATCH_ROWS) -> Iterator[Chunk]:
    """The records of a piece in chunks: jsonl lines as bytes; parquet/arrow values of ``column`` (strings
    or None), or whole rows as dicts when ``column`` is None."""
    if piece.format in ("jsonl", "gzip", "zstd"):
        yield from _jsonl_chunks(piece, chunk_rows)
    elif piece.format == "parquet":
        yield from _parquet_chunks(piece, column, None, chunk_rows)
    else:
        yield from _arrow_chunks(piece, column, None, chunk_rows)


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int | str, object]]:
    """(where, record) for every record of one input file: a jsonl line (bytes, blank ones included) with
    its line number, or a parquet/arrow row (dict) with its location."""
    path = Path(path)
    for piece in [Piece(path, detect_format(path), 1)] if detect_format(path) != "parquet" else pieces_of(path):
        for chunk in read_chunks(piece):
            for i, record in enumerate(chunk.records):
                where = chunk.where(i)
                yield (int(where) if isinstance(record, bytes) else where), record
