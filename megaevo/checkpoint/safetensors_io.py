"""Reading safetensors headers and writing safetensors files one tensor at a time.

:func:`read_header` lists a file's tensors (shape, dtype) from its JSON header alone, without
touching the data. :class:`StreamingWriter` lays out a whole file from the shapes and dtypes
known in advance, then takes the tensors in any order and writes each at its place, so a
converter holds one tensor in memory at a time however large the file is. The files it writes
are ordinary safetensors files (8-byte little-endian header length, JSON header padded to 8
bytes, data in header order). Given a running checksum, it feeds it the file's bytes as they go
out (the tensors then come in file order), so the file need not be read back to be checksummed.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megaevo.errors import ConvertError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F32, BF16, ...
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


def element_size(dtype: str) -> int:
    if dtype in DTYPES:
        return torch.empty((), dtype=DTYPES[dtype]).element_size()
    sizes = {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
    if dtype not in sizes:
        raise ConvertError(f"unknown safetensors dtype {dtype!r}")
    return sizes[dtype]


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of a safetensors file by name, and its ``__metadata__`` (read from the header only)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER or n > path.stat().st_size - 8:
            raise ConvertError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, entry in header.items():
        try:
            out[name] = TensorInfo(name, tuple(int(s) for s in entry["shape"]), str(entry["dtype"]), path)
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for tensor {name!r}") from None
    return out, meta


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"64KiB"`` or a plain number (decimal units, binary with ``i``)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, mult = s, 1
    try:
        value = float(number) * mult
    except ValueError:
        raise ConvertError(f"cannot read {text!r} as a size (e.g. 2GB, 500MB, 64KiB)") from None
    if value < 1:
        raise ConvertError(f"size {text!r} must be positive")
    return int(value)


class StreamingWriter:
    """A safetensors file laid out in advance from ``entries`` ((name, dtype, shape), in file order).

    ``write(name, tensor)`` puts one tensor at its place (any order, each exactly once);
    ``close()`` checks that every tensor was written. The file is preallocated, not filled, so
    nothing is written twice. ``size`` is the file's length in bytes. With ``checksum`` (an object
    with ``update(bytes)``, e.g. a ``hashlib`` hash or ``integrity.RunningChecksum``), every byte
    of the file goes through it in order, header first: tensors must then be written in file order.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, checksum=None):
        self.path = Path(path)
        self.checksum = checksum
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in entries:
            if name in self._slots:
                raise ValueError(f"{self.path}: tensor {name!r} listed twice")
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{self.path}: cannot store dtype {dtype} in safetensors")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (offset, dtype, tuple(shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_size = offset
        self._base = 8 + len(raw)
        self.size = self._base + offset
        self._next = 0  # with a checksum: the offset of the next tensor in file order
        head = struct.pack("<Q", len(raw)) + raw
        if checksum is not None:
            checksum.update(head)
        self._f = open(self.path, "wb")
        self._f.write(head)
        self._f.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"{self.path}: no slot for tensor {name!r} (or written twice)")
        offset, dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                             f"laid out as {dtype} {list(shape)}")
        if self.checksum is not None and offset != self._next:
            raise ValueError(f"{self.path}: tensor {name!r} written out of file order (needed for the checksum)")
        del self._slots[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            out = data.view(torch.uint8).numpy().data
            if self.checksum is not None:
                self.checksum.update(out)  # hashed (on a helper thread, with a RunningChecksum) while written
                self._next = offset + out.nbytes
            self._f.seek(self._base + offset)
            self._f.write(out)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._slots:
            raise ValueError(f"{self.path}: {len(self._slots)} tensor(s) never written, e.g. {next(iter(self._slots))!r}")

    def abort(self) -> None:
        self._f.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
