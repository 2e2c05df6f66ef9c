"""Indexed token datasets: `name.bin` + `name.idx`, byte-compatible with Megatron-LM's MMIDIDX format.

`name.bin` holds the token arrays back to back. `name.idx` is little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code (see DTYPE_CODES)
    u64       sequence count S
    u64       document count D (entries in the document index, i.e. documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  byte offsets of each sequence in .bin
    int64[D]  document index: sequence ids where documents start, beginning with 0 and ending with S
"""
from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np

from megaevo.data import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class DatasetFormatError(DataError):
    """An indexed dataset file is missing, truncated, foreign or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron-LM uses for a vocabulary: uint16 under 65,500, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(f"dtype {dtype} cannot be stored in an MMIDIDX index (supported: {sorted(map(str, _CODE_OF))})")
    return _CODE_OF[dtype]


def paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix + ".idx"), Path(prefix + ".bin")


def exists(prefix: str | os.PathLike) -> bool:
    idx, bin_ = paths(prefix)
    return idx.is_file() and bin_.is_file()


def _encode_header(dtype, n_sequences: int, n_doc_entries: int) -> bytes:
    return MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(dtype), n_sequences, n_doc_entries)


def write_index(
    idx_path: str | os.PathLike,
    dtype,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
    sequence_pointers: np.ndarray | None = None,
) -> None:
    """Write an .idx file. Pointers default to the contiguous layout implied by the lengths."""
    lengths = np.ascontiguousarray(sequence_lengths, dtype="<i4")
    if sequence_pointers is None:
        sequence_pointers = sequence_byte_offsets(lengths, np.dtype(dtype).itemsize)
    pointers = np.ascontiguousarray(sequence_pointers, dtype="<i8")
    docs = np.ascontiguousarray(document_indices, dtype="<i8")
    with open(idx_path, "wb") as f:
        f.write(_encode_header(dtype, len(lengths), len(docs)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(docs.tobytes())


def sequence_byte_offsets(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    return pointers * itemsize


class IndexedDataset:
    """Read-only view of `prefix.bin` / `prefix.idx` over numpy memory maps.

    Item i is sequence i as a 1-D array of the stored dtype. `get(i, offset, length)` reads part of one.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.idx_path, self.bin_path = paths(prefix)
        self.prefix = str(self.idx_path)[: -len(".idx")]
        for p, partner in ((self.idx_path, self.bin_path), (self.bin_path, self.idx_path)):
            if not p.is_file():
                what = "index" if p.suffix == ".idx" else "token"
                found = f" (found {partner})" if partner.is_file() else ""
                raise DatasetFormatError(f"{p}: {what} file not found{found}")
        self._read_index()
        self._open_bin()

    # -- index -----------------------------------------------------------------------------------
    def _fail(self, path, msg: str):
        raise DatasetFormatError(f"{path}: {msg}")

    def _read_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            self._fail(path, f"not an MMIDIDX index (magic bytes {head[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if len(head) < HEADER_SIZE:
            self._fail(path, f"truncated header ({len(head)} bytes, need {HEADER_SIZE})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            self._fail(path, f"unsupported index version {version} (supported: {VERSION})")
        if code not in DTYPE_CODES:
            self._fail(path, f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if expected != size:
            self._fail(
                path,
                f"header counts {n_seq} sequences and {n_doc} document-index entries, which need "
                f"{expected} bytes, but the file has {size} bytes",
            )
        if n_doc < 1:
            self._fail(path, "document index is empty (it must start with 0)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self._idx
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=off)
        docs = self.document_indices
        if docs[0] != 0:
            self._fail(path, f"document index must start with 0, starts with {int(docs[0])}")
        if docs[-1] != n_seq:
            self._fail(path, f"document index must end with the sequence count {n_seq}, ends with {int(docs[-1])}")

    def _open_bin(self) -> None:
        path = self.bin_path
        self.bin_size = path.stat().st_size
        n = len(self.sequence_lengths)
        if n:
            last_end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if last_end > self.bin_size:
                self._fail(
                    path,
                    f"sequence {n - 1} ends at byte {last_end} but the file has {self.bin_size} bytes "
                    f"(truncated, or not the partner of {self.idx_path.name})",
                )
        self._bin = np.memmap(path, dtype=np.uint8, mode="r") if self.bin_size else np.zeros(0, np.uint8)

    def validate(self) -> None:
        """Full consistency check of every entry (O(sequences)); the constructor checks only the ends."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if len(lengths) and lengths.min() < 0:
            i = int(np.argmin(lengths))
            self._fail(self.idx_path, f"sequence {i} has negative length {int(lengths[i])}")
        ends = pointers + lengths.astype(np.int64) * self.dtype.itemsize
        bad = np.flatnonzero((pointers < 0) | (ends > self.bin_size))
        if len(bad):
            i = int(bad[0])
            self._fail(
                self.bin_path,
                f"sequence {i} spans bytes {int(pointers[i])}..{int(ends[i])}, past the end of the file "
                f"({self.bin_size} bytes)",
            )
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            i = int(np.flatnonzero(np.diff(docs) < 0)[0])
            self._fail(self.idx_path, f"document index decreases at entry {i + 1}")

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx (to its end when length is None)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.prefix}: sequence {idx} out of range ({len(self)} sequences)")
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"{self.prefix}: tokens {offset}..{offset + length} out of range for sequence {idx} of length {seq_len}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        end = start + length * self.dtype.itemsize
        if start < 0 or end > self.bin_size:
            self._fail(self.bin_path, f"sequence {idx} points to bytes {start}..{end}, past the end of the file ({self.bin_size} bytes)")
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx + len(self) if idx < 0 else idx)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document doc (its sequences concatenated)."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"{self.prefix}: document {doc} out of range ({self.num_documents} documents)")
        beg, end = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        parts = [self.get(i) for i in range(beg, end)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


class IndexedDatasetWriter:
    """Stream sequences into `prefix.bin` / `prefix.idx`.

    Files are written under temporary names beside the final ones and renamed into place by
    `finalize()` (.bin first, then .idx), so an interrupted write never leaves a dataset under the
    final name. Use as a context manager: an exception discards the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.idx_path, self.bin_path = paths(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self.idx_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + tag)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._docs: list[int] = [0]
        self.num_tokens = 0
        self._closed = False

    def add_sequence(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.bin_path}: a sequence must be 1-D, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype:
            info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(
                    f"{self.bin_path}: token ids {int(arr.min())}..{int(arr.max())} do not fit {self.dtype}"
                )
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        self._docs.append(len(self._lengths))

    def add_document(self, tokens) -> None:
        """One sequence that is a whole document."""
        self.add_sequence(tokens)
        self.end_document()

    def add_index(self, other: IndexedDataset) -> None:
        """Append every sequence and document of another dataset (streamed byte copy)."""
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {other.prefix} ({other.dtype}) into {self.bin_path} ({self.dtype})")
        base = len(self._lengths)
        contiguous = np.array_equal(
            other.sequence_pointers, sequence_byte_offsets(other.sequence_lengths, self.dtype.itemsize)
        ) and other.bin_size == other.num_tokens * self.dtype.itemsize
        if contiguous:
            self._lengths.extend(other.sequence_lengths.tolist())
            self.num_tokens += other.num_tokens
            with open(other.bin_path, "rb") as f:
                shutil.copyfileobj(f, self._bin, 16 << 20)
        else:
            for i in range(len(other)):
                self.add_sequence(other.get(i))
        self._docs.extend((other.document_indices[1:] + base).tolist())

    def finalize(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bin.close()
        if self._docs[-1] != len(self._lengths):
            self._docs.append(len(self._lengths))
        write_index(self._tmp_idx, self.dtype, np.asarray(self._lengths, dtype=np.int32), np.asarray(self._docs))
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def merge_datasets(prefixes: list[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate several datasets of one dtype into one, documents in order."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    parts = [IndexedDataset(p) for p in prefixes]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise DataError("cannot merge datasets of different dtypes: " + ", ".join(f"{p.prefix} ({p.dtype})" for p in parts))
    with IndexedDatasetWriter(output_prefix, parts[0].dtype) as w:
        for p in parts:
            w.add_index(p)
    return IndexedDataset(output_prefix)


def summarize(prefix: str | os.PathLike) -> dict:
    """What `megaevo inspect` prints for a dataset prefix (reads every token once for the vocab range)."""
    ds = IndexedDataset(prefix)
    ds.validate()
    lo = hi = None
    if ds.bin_size:
        step = 1 << 26
        tokens = np.frombuffer(ds._bin, dtype=ds.dtype, count=ds.bin_size // ds.dtype.itemsize)
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            lo = chunk.min() if lo is None else min(lo, chunk.min())
            hi = chunk.max() if hi is None else max(hi, chunk.max())
    lengths = ds.sequence_lengths
    return {
        "prefix": ds.prefix,
        "format": "MMIDIDX v1",
        "dtype": str(ds.dtype),
        "documents": ds.num_documents,
        "sequences": len(ds),
        "tokens": ds.num_tokens,
        "min_token_id": None if lo is None else int(lo),
        "max_token_id": None if hi is None else int(hi),
        "mean_sequence_length": float(lengths.mean()) if len(lengths) else 0.0,
        "max_sequence_length": int(lengths.max()) if len(lengths) else 0,
        "bin_bytes": ds.bin_size,
    }
