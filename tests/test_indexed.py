"""The MMIDIDX indexed dataset: exact bytes, round trips, merging, atomic writes and every format error."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megaevo import cli
from megaevo.data import indexed
from megaevo.data.indexed import (
    DatasetFormatError,
    IndexedDataset,
    IndexedDatasetWriter,
    merge_datasets,
    summarize,
    token_dtype,
    write_index,
)


def write_docs(prefix, docs, dtype=np.uint16):
    """Write each document (a list of sequences) and return the prefix."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(np.asarray(seq))
            w.end_document()
    return prefix


def idx_bytes(code, lengths, pointers, doc_index, version=1, magic=b"MMIDIDX\x00\x00"):
    """The .idx layout built field by field with struct, independently of the writer."""
    out = magic + struct.pack("<Q", version) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(doc_index)}q", *doc_index)
    return out


# -- exact bytes ---------------------------------------------------------------------------------


def test_exact_bytes_uint16(tmp_path):
    prefix = tmp_path / "ds"
    write_docs(prefix, [[[1, 2, 3]], [[300], [65535, 0]], [[7]]])
    expected_idx = idx_bytes(8, [3, 1, 2, 1], [0, 6, 8, 12], [0, 1, 3, 4])
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<7H", 1, 2, 3, 300, 65535, 0, 7)


def test_exact_bytes_int32_header(tmp_path):
    prefix = tmp_path / "ds"
    write_docs(prefix, [[[70000, -1]]], dtype=np.int32)
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert raw[9:17] == b"\x01" + b"\x00" * 7  # u64 version 1, little-endian
    assert raw[17] == 4  # int32
    assert raw == idx_bytes(4, [2], [0], [0, 1])
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<2i", 70000, -1)


def test_reads_hand_built_files(tmp_path):
    """A dataset written without the writer (as Megatron-LM would) reads back."""
    (tmp_path / "m.idx").write_bytes(idx_bytes(4, [2, 1, 3], [0, 8, 12], [0, 2, 3]))
    (tmp_path / "m.bin").write_bytes(struct.pack("<6i", 10, 11, 12, 13, 14, 15))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32
    assert len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 6
    assert ds[1].tolist() == [12]
    assert ds.document(0).tolist() == [10, 11, 12]
    assert ds.document(1).tolist() == [13, 14, 15]


def test_write_index_dtype_codes(tmp_path):
    for code, dtype in indexed.DTYPE_CODES.items():
        write_index(tmp_path / "x.idx", dtype, np.array([1, 2]), np.array([0, 2]))
        size = np.dtype(dtype).itemsize
        assert (tmp_path / "x.idx").read_bytes() == idx_bytes(code, [1, 2], [0, size], [0, 2])


def test_prefix_may_name_either_file(tmp_path):
    write_docs(tmp_path / "ds", [[[5, 6]]])
    for name in ("ds", "ds.bin", "ds.idx"):
        assert IndexedDataset(tmp_path / name)[0].tolist() == [5, 6]


# -- round trips ---------------------------------------------------------------------------------

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64, np.uint16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (int(info.min), int(info.max)) if info else (-1e6, 1e6)
    docs = [[np.array([lo, hi, 0], dtype=dtype)], [np.array([1, 2], dtype=dtype), np.array([3], dtype=dtype)]]
    ds = IndexedDataset(write_docs(tmp_path / "ds", docs, dtype))
    assert ds.dtype == np.dtype(dtype)
    assert [ds[i].tolist() for i in range(len(ds))] == [[lo, hi, 0], [1, 2], [3]]
    assert ds.document(1).tolist() == [1, 2, 3]


token_lists = st.lists(st.integers(0, 65535), max_size=20)
documents = st.lists(st.lists(token_lists, min_size=0, max_size=3), max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=documents, wide=st.booleans())
def test_round_trip_random_documents(tmp_path, docs, wide):
    dtype = np.int32 if wide else np.uint16
    ds = IndexedDataset(write_docs(tmp_path / f"r{int(wide)}", docs, dtype))
    ds.validate()
    seqs = [s for d in docs for s in d]
    assert len(ds) == len(seqs)
    assert ds.num_documents == len(docs)
    assert ds.num_tokens == sum(map(len, seqs))
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert [ds.document(d).tolist() for d in range(len(docs))] == [sum(d, []) for d in docs]
    expected_index = np.cumsum([0] + [len(d) for d in docs])
    assert ds.document_indices.tolist() == expected_index.tolist()


def test_get_slices(tmp_path):
    ds = IndexedDataset(write_docs(tmp_path / "ds", [[list(range(10))], [[20, 21, 22]]]))
    assert ds.get(0, 3, 4).tolist() == [3, 4, 5, 6]
    assert ds.get(0, 7).tolist() == [7, 8, 9]
    assert ds.get(1, 0, 0).tolist() == []
    assert ds.get(1, 3).tolist() == []
    assert ds[-1].tolist() == [20, 21, 22]


def test_get_out_of_range(tmp_path):
    ds = IndexedDataset(write_docs(tmp_path / "ds", [[[1, 2, 3]], [[4]]]))
    for bad in [(0, 2, 2), (0, 4), (0, -1, 1), (1, 0, 2)]:
        with pytest.raises(IndexError, match="out of range"):
            ds.get(*bad)
    with pytest.raises(IndexError):
        ds.get(2)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(IndexError, match="out of range"):
        ds[-3]
    with pytest.raises(IndexError):
        ds.document(2)


def test_empty_documents_and_sequences(tmp_path):
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix) as w:
        w.add_document([])  # a document of one empty sequence
        w.end_document()  # a document with no sequences at all
        w.add_document([9])
    ds = IndexedDataset(prefix)
    ds.validate()
    assert ds.num_documents == 3 and len(ds) == 2
    assert ds.document_indices.tolist() == [0, 1, 1, 2]
    assert ds.document(0).tolist() == [] and ds.document(1).tolist() == [] and ds.document(2).tolist() == [9]
    assert ds[0].dtype == np.uint16


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e"):
        pass
    assert (tmp_path / "e.bin").read_bytes() == b""
    assert (tmp_path / "e.idx").read_bytes() == idx_bytes(8, [], [], [0])
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
    info = summarize(tmp_path / "e")
    assert info["tokens"] == 0 and info["min_token_id"] is None and info["max_token_id"] is None


def test_trailing_sequences_close_a_document(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds") as w:
        w.add_document([1])
        w.add_sequence([2])
        w.add_sequence([3])
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.document_indices.tolist() == [0, 1, 3]
    assert ds.document(1).tolist() == [2, 3]


def test_writer_refuses_tokens_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_sequence(np.array([1, 70000]))
    with pytest.raises(ValueError, match="do not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_sequence(np.array([-1]))
    with pytest.raises(ValueError, match="1-D"):
        with IndexedDatasetWriter(tmp_path / "ds") as w:
            w.add_sequence(np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetWriter(tmp_path / "ds", np.uint32)
    assert list(tmp_path.iterdir()) == []


# -- merging -------------------------------------------------------------------------------------


def test_merge_is_concatenation(tmp_path):
    parts = [
        [[[1, 2]], [[3], [4, 5]]],
        [],
        [[[6]], [[]], [[7, 8, 9]]],
    ]
    prefixes = [write_docs(tmp_path / f"p{i}", docs) for i, docs in enumerate(parts)]
    merged = merge_datasets(prefixes, tmp_path / "out" / "merged")
    merged.validate()
    all_docs = [d for docs in parts for d in docs]
    seqs = [s for d in all_docs for s in d]
    assert [merged[i].tolist() for i in range(len(merged))] == seqs
    assert merged.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert merged.document_indices.tolist() == np.cumsum([0] + [len(d) for d in all_docs]).tolist()
    assert [merged.document(d).tolist() for d in range(merged.num_documents)] == [sum(d, []) for d in all_docs]
    expected_bin = b"".join((tmp_path / f"p{i}.bin").read_bytes() for i in range(3))
    assert (tmp_path / "out" / "merged.bin").read_bytes() == expected_bin


def test_cli_merge(tmp_path, capsys):
    a = write_docs(tmp_path / "a", [[[1, 2]], [[3]]])
    b = write_docs(tmp_path / "b", [[[4, 5, 6]]])
    assert cli.main(["merge", "--input", str(a), str(b), "--output-prefix", str(tmp_path / "ab")]) == 0
    assert "3 documents" in capsys.readouterr().out
    merged = IndexedDataset(tmp_path / "ab")
    assert [merged.document(d).tolist() for d in range(3)] == [[1, 2], [3], [4, 5, 6]]
    assert cli.main(["merge", "--input", str(tmp_path / "none"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_merge_non_contiguous_input(tmp_path):
    """A dataset whose pointers skip bytes in .bin is merged by sequence, not by byte copy."""
    (tmp_path / "gap.bin").write_bytes(struct.pack("<5H", 1, 2, 99, 3, 4))
    write_index(tmp_path / "gap.idx", np.uint16, np.array([2, 2]), np.array([0, 1, 2]), np.array([0, 6]))
    write_docs(tmp_path / "b", [[[5]]])
    merged = merge_datasets([tmp_path / "gap", tmp_path / "b"], tmp_path / "m")
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3, 4], [5]]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]
    assert (tmp_path / "m.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 4, 5)


def test_merge_refuses_mixed_dtypes(tmp_path):
    a = write_docs(tmp_path / "a", [[[1]]], np.uint16)
    b = write_docs(tmp_path / "b", [[[1]]], np.int32)
    with pytest.raises(ValueError, match="different dtypes"):
        merge_datasets([a, b], tmp_path / "m")
    with pytest.raises(ValueError, match="at least one"):
        merge_datasets([], tmp_path / "m")
    assert not (tmp_path / "m.bin").exists() and not (tmp_path / "m.idx").exists()


# -- atomic writes -------------------------------------------------------------------------------


def test_writer_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "sub" / "ds") as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert list((tmp_path / "sub").iterdir()) == []


def test_writer_exception_keeps_previous_dataset(tmp_path):
    write_docs(tmp_path / "ds", [[[1, 2]]])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "ds") as w:
            w.add_document([7, 7, 7])
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_writer_uses_temporary_names_until_finalized(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds")
    w.add_document([1])
    assert not indexed.exists(tmp_path / "ds")
    w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


# -- format errors -------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    """A valid three-sequence dataset; returns (prefix, idx bytes, bin bytes)."""
    prefix = write_docs(tmp_path / "ds", [[[1, 2, 3]], [[4, 5], [6]]])
    return prefix, (tmp_path / "ds.idx").read_bytes(), (tmp_path / "ds.bin").read_bytes()


def expect_error(prefix, file_suffix, *fragments):
    with pytest.raises(DatasetFormatError) as err:
        IndexedDataset(prefix)
    msg = str(err.value)
    assert msg.startswith(str(prefix) + file_suffix + ":"), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_foreign_file(good, tmp_path):
    prefix, _, _ = good
    (tmp_path / "ds.idx").write_bytes(b"PK\x03\x04 this is a zip file, not an index" * 3)
    expect_error(prefix, ".idx", "not an MMIDIDX index", "magic")


def test_tiny_and_empty_idx(good, tmp_path):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(b"")
    expect_error(prefix, ".idx", "not an MMIDIDX index")
    (tmp_path / "ds.idx").write_bytes(raw[:20])
    expect_error(prefix, ".idx", "truncated header")


def test_unknown_version(good, tmp_path):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    expect_error(prefix, ".idx", "version 2")


@pytest.mark.parametrize("code", [0, 9, 255])
def test_unknown_dtype_code(good, tmp_path, code):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(raw[:17] + bytes([code]) + raw[18:])
    expect_error(prefix, ".idx", f"unknown dtype code {code}")


def test_truncated_idx(good, tmp_path):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(raw[:-8])
    expect_error(prefix, ".idx", "3 sequences", "3 document-index entries", f"{len(raw)} bytes", f"{len(raw) - 8} bytes")


def test_extra_bytes_in_idx(good, tmp_path):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(raw + b"\x00" * 4)
    expect_error(prefix, ".idx", f"but the file has {len(raw) + 4} bytes")


def test_counts_too_large(good, tmp_path):
    prefix, raw, _ = good
    (tmp_path / "ds.idx").write_bytes(raw[:18] + struct.pack("<Q", 2**62) + raw[26:])
    expect_error(prefix, ".idx", f"{2**62} sequences")


def test_truncated_bin(good, tmp_path):
    prefix, _, raw_bin = good
    (tmp_path / "ds.bin").write_bytes(raw_bin[:-2])
    expect_error(prefix, ".bin", "sequence 2 ends at byte 12", "10 bytes", "truncated")


def test_missing_partner(good, tmp_path):
    prefix, _, _ = good
    (tmp_path / "ds.idx").rename(tmp_path / "keep.idx")
    expect_error(prefix, ".idx", "index file not found", "found " + str(tmp_path / "ds.bin"))
    (tmp_path / "keep.idx").rename(tmp_path / "ds.idx")
    (tmp_path / "ds.bin").unlink()
    expect_error(prefix, ".bin", "token file not found", "found " + str(tmp_path / "ds.idx"))
    (tmp_path / "ds.idx").unlink()
    expect_error(prefix, ".idx", "not found")


def test_document_index_must_start_at_zero(tmp_path):
    (tmp_path / "ds.idx").write_bytes(idx_bytes(8, [1, 1], [0, 2], [1, 2]))
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 4)
    expect_error(tmp_path / "ds", ".idx", "must start with 0, starts with 1")


def test_document_index_must_end_at_count(tmp_path):
    (tmp_path / "ds.idx").write_bytes(idx_bytes(8, [1, 1], [0, 2], [0, 1]))
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 4)
    expect_error(tmp_path / "ds", ".idx", "must end with the sequence count 2, ends with 1")


def test_empty_document_index(tmp_path):
    (tmp_path / "ds.idx").write_bytes(idx_bytes(8, [], [], []))
    (tmp_path / "ds.bin").write_bytes(b"")
    expect_error(tmp_path / "ds", ".idx", "document index is empty")


def test_validate_catches_corrupt_middle_pointer(tmp_path):
    (tmp_path / "ds.idx").write_bytes(idx_bytes(8, [2, 2, 2], [0, 1000, 8], [0, 3]))
    (tmp_path / "ds.bin").write_bytes(b"\x00" * 12)
    ds = IndexedDataset(tmp_path / "ds")  # the constructor checks only the last sequence
    with pytest.raises(DatasetFormatError) as err:
        ds.validate()
    assert str(err.value).startswith(str(tmp_path / "ds.bin") + ":")
    assert "sequence 1 spans bytes 1000..1004" in str(err.value)
    with pytest.raises(DatasetFormatError, match="past the end"):
        ds.get(1)


def test_validate_catches_negative_length_and_decreasing_index(tmp_path):
    (tmp_path / "a.idx").write_bytes(idx_bytes(8, [2, -1, 1], [0, 4, 4], [0, 3]))
    (tmp_path / "a.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(DatasetFormatError, match="sequence 1 has negative length -1"):
        IndexedDataset(tmp_path / "a").validate()
    (tmp_path / "b.idx").write_bytes(idx_bytes(8, [1, 1, 1], [0, 2, 4], [0, 2, 1, 3]))
    (tmp_path / "b.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(DatasetFormatError, match="decreases at entry 2"):
        IndexedDataset(tmp_path / "b").validate()


# -- token dtype, summary, CLI -------------------------------------------------------------------


def test_token_dtype_boundaries():
    assert token_dtype(256) == np.uint16
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32


def test_summarize(tmp_path):
    prefix = write_docs(tmp_path / "ds", [[[5, 9, 7]], [[300, 6], [8]]])
    info = summarize(prefix)
    assert info["documents"] == 2
    assert info["sequences"] == 3
    assert info["tokens"] == 6
    assert info["dtype"] == "uint16"
    assert (info["min_token_id"], info["max_token_id"]) == (5, 300)
    assert info["max_sequence_length"] == 3
    assert info["mean_sequence_length"] == pytest.approx(2.0)
    assert info["bin_bytes"] == 12


def test_cli_inspect_json(tmp_path, capsys):
    prefix = write_docs(tmp_path / "ds", [[[70000, 3]], [[4]]], np.int32)
    assert cli.main(["inspect", str(prefix), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 2 and info["sequences"] == 2 and info["tokens"] == 3
    assert info["dtype"] == "int32"
    assert (info["min_token_id"], info["max_token_id"]) == (3, 70000)


def test_cli_inspect_text(tmp_path, capsys):
    prefix = write_docs(tmp_path / "ds", [[[1, 2]]])
    assert cli.main(["inspect", str(prefix) + ".idx"]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "uint16" in out


def test_cli_inspect_missing(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: megaevo inspect: ") and "not a dataset prefix" in err and len(err.splitlines()) == 1
    assert str(tmp_path / "nothing") in err


def test_cli_inspect_half_dataset(tmp_path, capsys):
    (tmp_path / "ds.bin").write_bytes(b"\x00\x00")
    assert cli.main(["inspect", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "index file not found" in err and str(tmp_path / "ds.idx") in err
