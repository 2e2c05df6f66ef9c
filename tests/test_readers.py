"""Corpora as they are kept: jsonl.zst, parquet, Hugging Face dataset folders, directories and globs;
the same texts give the same bytes; sharded preprocessing and merge."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from megaevo.cli import main
from megaevo.data import readers
from megaevo.data.indexed import merge_datasets
from megaevo.data.preprocess import PreprocessError, preprocess
from megaevo.data.readers import Piece, expand_inputs, shard_pieces

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")


def jsonl_bytes(texts, key="text") -> bytes:
    return "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode("utf-8")


def write_jsonl(path: Path, texts, key="text") -> Path:
    path.write_bytes(jsonl_bytes(texts, key))
    return path


def write_zst(path: Path, texts, frames: int = 2) -> Path:
    """Several zstd frames back to back, as streaming compressors write them."""
    cut = len(texts) // frames
    parts = [texts[i * cut : (i + 1) * cut if i < frames - 1 else None] for i in range(frames)]
    path.write_bytes(b"".join(zstd.ZstdCompressor().compress(jsonl_bytes(p)) for p in parts))
    return path


def write_parquet(path: Path, texts, row_group_size: int = 37, key="text") -> Path:
    table = pa.table({"id": list(range(len(texts))), key: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_folder(folder: Path, texts, files: int = 2) -> Path:
    """A `datasets.Dataset.save_to_disk` folder: arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    names, cut = [], len(texts) // files
    for i in range(files):
        part = texts[i * cut : (i + 1) * cut if i < files - 1 else None]
        name = f"data-{i:05d}-of-{files:05d}.arrow"
        table = pa.table({"text": part})
        with pa.ipc.new_stream(folder / name, table.schema) as w:
            for batch in table.to_batches(max_chunksize=29):
                w.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def dataset_bytes(prefix: Path, suffixes=(".bin", ".idx")) -> list[bytes]:
    return [Path(str(prefix) + s).read_bytes() for s in suffixes]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr("megaevo.data.preprocess.CHUNK_LINES", 7)


def test_same_texts_in_every_container_give_the_same_bytes(small_chunks, tmp_path, spm_model, corpus_texts):
    texts = corpus_texts[:150] + [""] + corpus_texts[150:200]  # an empty document too
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", texts[:90])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", texts[90:])
    (hub / "README.md").write_text("a dataset card\n")
    (hub / ".cache").mkdir()
    write_parquet(hub / ".cache" / "stale.parquet", texts[:3])  # hidden: skipped
    inputs = {
        "jsonl": [write_jsonl(tmp_path / "c.jsonl", texts)],
        "zst": [write_zst(tmp_path / "c.jsonl.zst", texts, frames=3)],
        "parquet": [write_parquet(tmp_path / "c.parquet", texts)],
        "arrow": [write_hf_folder(tmp_path / "saved", texts)],
        "hub": [hub],
    }
    reference = None
    for name, src in inputs.items():
        for workers in (1, 2):
            prefix = tmp_path / f"{name}-{workers}"
            s = preprocess(src, prefix, str(spm_model), workers=workers, append_eod=True, progress=False)
            assert (s.documents, s.empty) == (len(texts), 1), name
            got = dataset_bytes(prefix)
            reference = reference or got
            assert got == reference, f"{name} with {workers} worker(s)"


def test_inputs_expand_in_sorted_order(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    for rel in ("b/2.jsonl", "a.parquet", "b/10.jsonl.zst", "c.jsonl.gz", "notes.txt", ".hidden.jsonl"):
        (d / rel).write_bytes(b"x")
    assert [p.relative_to(d).as_posix() for p in expand_inputs([d])] == ["a.parquet", "b/10.jsonl.zst", "b/2.jsonl",
                                                                         "c.jsonl.gz"]
    assert [p.name for p in expand_inputs([str(d / "b" / "*"), d / "a.parquet"])] == ["10.jsonl.zst", "2.jsonl",
                                                                                       "a.parquet"]
    with pytest.raises(readers.InputError, match=r"nope\*.jsonl: no file matches"):
        expand_inputs([str(d / "nope*.jsonl")])
    (d / "dsdict" / "train").mkdir(parents=True)
    (d / "dsdict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (d / "dsdict" / "train" / "state.json").write_text('{"_data_files": []}')
    with pytest.raises(readers.InputError, match=r"a DatasetDict folder; give one split's folder \(.*train\)"):
        expand_inputs([d / "dsdict"])


def test_bad_rows_are_named_and_honour_on_error(tmp_path, spm_model, corpus_texts):
    texts = corpus_texts[:60]
    table = pa.table({"text": texts[:40] + [None] + texts[40:]})
    pq.write_table(table, tmp_path / "n.parquet", row_group_size=20)
    with pytest.raises(PreprocessError, match=r"n\.parquet:row group 2, row 0: 'text' is null"):
        preprocess([tmp_path / "n.parquet"], tmp_path / "out", str(spm_model), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.parquet"]
    s = preprocess([tmp_path / "n.parquet"], tmp_path / "out", str(spm_model), on_error="skip", progress=False)
    assert (s.documents, s.skipped, s.skipped_locations) == (60, 1, [f"{tmp_path / 'n.parquet'}:row group 2, row 0: "
                                                                      f"'text' is null"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(PreprocessError, match=r"ints\.parquet: column 'text' is int64, not a string column"):
        preprocess([tmp_path / "ints.parquet"], tmp_path / "out2", str(spm_model), progress=False)


def test_a_bad_line_in_a_byte_range_keeps_its_line_number(monkeypatch, tmp_path, spm_model, corpus_texts):
    src = write_jsonl(tmp_path / "big.jsonl", corpus_texts[:50])
    lines = src.read_bytes().splitlines(keepends=True)
    lines[37] = b'{"text": 5}\n'
    src.write_bytes(b"".join(lines))
    monkeypatch.setattr(readers, "PIECE_BYTES", 700)
    assert len(readers.pieces_of(src)) > 3
    for i in range(3):
        try:
            preprocess([src], tmp_path / f"s{i}", str(spm_model), shard=(i, 3), progress=False)
        except PreprocessError as e:
            assert str(e).startswith(f"{src}:38: 'text' is int, not a string")
            break
    else:
        pytest.fail("no shard reported the bad line")


def test_shard_pieces_are_contiguous_and_cover_everything():
    rng = random.Random(0)
    for n_pieces in (1, 2, 7, 40):
        pieces = [Piece(Path(f"f{i}"), "jsonl", rng.randint(1, 1000)) for i in range(n_pieces)]
        for shards in (1, 2, 3, 8):
            runs = [shard_pieces(pieces, i, shards) for i in range(shards)]
            assert [p for run in runs for p in run] == pieces


@pytest.mark.parametrize("workers", [1, 2])
def test_three_shards_merged_equal_one_job(monkeypatch, small_chunks, tmp_path, spm_model, corpus_texts, workers):
    monkeypatch.setattr(readers, "PIECE_BYTES", 4096)  # the jsonl file is cut into byte ranges
    inputs = [write_jsonl(tmp_path / "a.jsonl", corpus_texts[:120]),
              write_parquet(tmp_path / "b.parquet", corpus_texts[120:260], row_group_size=25),
              write_zst(tmp_path / "c.jsonl.zst", corpus_texts[260:])]
    assert len(readers.pieces_of(inputs[0])) > 3 and len(readers.pieces_of(inputs[1])) == 6
    whole = preprocess(inputs, tmp_path / "whole", str(spm_model), workers=workers, progress=False)
    for i in range(3):
        assert main(["preprocess", "--input", *map(str, inputs), "--tokenizer", str(spm_model), "--output-prefix",
                     str(tmp_path / f"shard{i}"), "--shard", f"{i}/3", "--workers", str(workers), "--quiet"]) == 0
    assert main(["merge", "--input", *(str(tmp_path / f"shard{i}") for i in range(3)),
                 "--output-prefix", str(tmp_path / "merged")]) == 0
    sizes = [len(dataset_bytes(tmp_path / f"shard{i}")[0]) for i in range(3)]
    assert all(sizes) and whole.documents == len(corpus_texts)
    assert dataset_bytes(tmp_path / "merged") == dataset_bytes(tmp_path / "whole")


def test_more_shards_than_pieces_give_empty_shards(tmp_path, spm_model, corpus_texts):
    src = write_jsonl(tmp_path / "a.jsonl", corpus_texts[:10])
    for i in range(3):
        preprocess([src], tmp_path / f"s{i}", str(spm_model), shard=(i, 3), progress=False)
    merge_datasets([tmp_path / f"s{i}" for i in range(3)], tmp_path / "m")
    preprocess([src], tmp_path / "w", str(spm_model), progress=False)
    assert dataset_bytes(tmp_path / "m") == dataset_bytes(tmp_path / "w")
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(PreprocessError, match="--shard"):
            preprocess([src], tmp_path / "x", str(spm_model), shard=bad, progress=False)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: megaevo preprocess: "), err
    return err


def test_truncated_files_and_a_missing_column_are_one_line(tmp_path, spm_model, corpus_texts, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_texts[:5])
    write_parquet(tmp_path / "p.parquet", corpus_texts[:100])
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    write_zst(tmp_path / "z.jsonl.zst", corpus_texts[:100], frames=1)
    data = (tmp_path / "z.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) - 40])
    out = tmp_path / "out" / "ds"
    base = ["preprocess", "--tokenizer", str(spm_model), "--output-prefix", str(out), "--quiet"]
    err = one_line_error(capsys, base + ["--input", str(good), str(tmp_path / "cut.parquet")])
    assert "cut.parquet: not a readable parquet file (truncated or corrupt" in err
    err = one_line_error(capsys, base + ["--input", str(good), str(tmp_path / "cut.jsonl.zst")])
    assert "cut.jsonl.zst: truncated zstd file" in err
    err = one_line_error(capsys, base + ["--input", str(tmp_path / "p.parquet"), "--key", "content"])
    assert "p.parquet: no column 'content' (columns: 'id', 'text')" in err
    assert not (tmp_path / "out").exists()  # nothing, not even a temporary file or the folder


def test_a_missing_optional_package_names_its_extra(monkeypatch, tmp_path, spm_model, corpus_texts, capsys):
    write_zst(tmp_path / "z.jsonl.zst", corpus_texts[:5])
    write_parquet(tmp_path / "p.parquet", corpus_texts[:5])
    base = ["preprocess", "--tokenizer", str(spm_model), "--output-prefix", str(tmp_path / "o"), "--quiet", "--input"]
    monkeypatch.setitem(sys.modules, "zstandard", None)
    err = one_line_error(capsys, base + [str(tmp_path / "z.jsonl.zst")])
    assert "needs the optional package 'zstandard'" in err and "pip install 'megaevo[zstd]'" in err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    err = one_line_error(capsys, base + [str(tmp_path / "p.parquet")])
    assert "needs the optional package 'pyarrow'" in err and "pip install 'megaevo[parquet]'" in err


def test_evaluation_sets_read_through_the_same_readers(tmp_path):
    from megaevo.eval.tasks import EvalError, load_generative

    rows = [{"problem": f"What is {i} + {i}?", "gt_answer": str(2 * i)} for i in range(30)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "set.parquet", row_group_size=8)
    (tmp_path / "set.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress((tmp_path / "set.jsonl").read_bytes()))
    want = [(p.problem, p.gold) for p in load_generative(tmp_path / "set.jsonl").problems]
    for name in ("set.parquet", "set.jsonl.zst"):
        assert [(p.problem, p.gold) for p in load_generative(tmp_path / name).problems] == want
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "gt_answer": "1"}\n{oops\n')
    with pytest.raises(EvalError, match=r"bad\.jsonl:2: not valid JSON"):
        load_generative(tmp_path / "bad.jsonl")
