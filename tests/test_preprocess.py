"""Preprocessing jsonl into indexed datasets, and the CLI around it."""
from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from megaevo.cli import main
from megaevo.data.gpt_dataset import GPTDataset
from megaevo.data.indexed import IndexedDataset, merge_datasets, summarize, write_index
from megaevo.data.preprocess import PreprocessError, preprocess
from megaevo.data.tokenizers import SentencePieceTokenizer
from megaevo.log import setup_logging


def write_jsonl(path: Path, texts, key: str = "text", extra_lines=()) -> Path:
    lines = [json.dumps({key: t, "id": i}) for i, t in enumerate(texts)]
    for at, line in extra_lines:
        lines.insert(at, line)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def documents(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    ds.validate()
    per_document = np.diff(ds.document_indices)
    assert set(per_document.tolist()) <= {0, 1}  # one sequence per document, none for an empty one
    return [ds.document(i).tolist() for i in range(ds.num_documents)]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def small_chunks(monkeypatch):
    """Many chunks from few lines, so that several are in flight across the workers."""
    monkeypatch.setattr("megaevo.data.preprocess.CHUNK_LINES", 7)


@pytest.mark.parametrize("append_eod", [False, True])
def test_documents_match_encode_and_output_is_independent_of_workers(small_chunks, tmp_path, spm_model, spm_tokenizer, corpus_texts, append_eod):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts, extra_lines=[(3, ""), (10, "   ")])
    out = {}
    for workers in (1, 2):
        summary = preprocess([src], tmp_path / f"w{workers}", str(spm_model), workers=workers, append_eod=append_eod, progress=False)
        out[workers] = [(tmp_path / f"w{workers}{ext}").read_bytes() for ext in (".bin", ".idx")]
        assert (summary.documents, summary.skipped, summary.empty, summary.dtype) == (len(corpus_texts), 0, 0, "uint16")
    assert out[1] == out[2]
    eod = [2] if append_eod else []
    expected = [spm_tokenizer.encode(t) + eod for t in corpus_texts]
    assert documents(tmp_path / "w1") == expected
    assert summary.tokens == sum(map(len, expected)) == IndexedDataset(tmp_path / "w1").num_tokens
    json.dumps(summary.as_dict())
    assert f"{summary.documents:,}" in summary.describe() and f"{summary.tokens:,}" in summary.describe()


def test_gzip_inputs_in_order_and_empty_documents(tmp_path, spm_tokenizer, corpus_texts):
    a = write_jsonl(tmp_path / "a.jsonl.gz", corpus_texts[:50])
    b = write_jsonl(tmp_path / "b.jsonl", corpus_texts[50:80] + [""])  # an empty text: a document, no sequence
    c = tmp_path / "c.data"  # gzip recognised by its magic bytes
    c.write_bytes(gzip.compress((json.dumps({"text": corpus_texts[80]}) + "\n").encode()))
    summary = preprocess([a, b, c], tmp_path / "out", spm_tokenizer, workers=2, progress=False)
    assert documents(tmp_path / "out") == [spm_tokenizer.encode(t) for t in corpus_texts[:80] + ["", corpus_texts[80]]]
    assert (summary.documents, summary.empty) == (82, 1) and len(IndexedDataset(tmp_path / "out")) == 81
    assert "1 documents with no tokens" in summary.describe()
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "x"}\n')
    with pytest.raises(PreprocessError, match="fake.jsonl.gz: named .gz but not gzip"):
        preprocess([tmp_path / "fake.jsonl.gz"], tmp_path / "fake", spm_tokenizer, progress=False)


@pytest.mark.parametrize("append_eod", [False, True])
def test_empty_document_is_kept_as_megatron_keeps_it(tmp_path, spm_tokenizer, append_eod):
    """An empty text is a document with no sequence: document index [0, 1, 1, 2], as Megatron-LM writes it."""
    texts = ["def f(): pass", "", "x = 1"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = preprocess([src], tmp_path / "out", spm_tokenizer, append_eod=append_eod, progress=False)
    assert (summary.documents, summary.empty) == (3, 1)

    eod = [spm_tokenizer.eod_id] if append_eod else []
    sequences = [spm_tokenizer.encode(t) + eod for t in texts if t]  # no end-of-document token for the empty one
    assert all(len(s) > 1 for s in sequences)
    expected_idx = tmp_path / "expected.idx"
    write_index(expected_idx, np.uint16, np.array([len(s) for s in sequences]), np.array([0, 1, 1, 2]))
    assert (tmp_path / "out.idx").read_bytes() == expected_idx.read_bytes()
    assert (tmp_path / "out.bin").read_bytes() == np.array(sum(sequences, []), dtype="<u2").tobytes()

    ds = IndexedDataset(tmp_path / "out")
    ds.validate()
    assert ds.document_indices.tolist() == [0, 1, 1, 2] and len(ds) == 2 and ds.num_documents == 3
    assert [ds.document(i).tolist() for i in range(3)] == [sequences[0], [], sequences[1]]
    assert summarize(tmp_path / "out")["documents"] == 3
    merged = merge_datasets([tmp_path / "out", tmp_path / "out"], tmp_path / "merged")
    assert merged.document_indices.tolist() == [0, 1, 1, 2, 3, 3, 4]
    samples = GPTDataset(ds, 2, None, seed=1, cache_dir=tmp_path / "cache")  # splits are over sequences
    assert len(samples) > 0 and len(samples[0]) == 3


BAD_LINES = [
    (5, '{"text": "unterminated'),
    (9, '["a", "list"]'),
    (14, '{"body": "wrong key"}'),
    (20, '{"text": 42}'),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_line_fails_naming_file_and_line_and_writes_nothing(small_chunks, tmp_path, spm_model, corpus_texts, workers):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_texts)
    bad = write_jsonl(tmp_path / "bad.jsonl", corpus_texts[:30], extra_lines=BAD_LINES[2:])
    with pytest.raises(PreprocessError, match=r"bad\.jsonl:15: key 'text' missing \(keys: 'body'\)") as e:
        preprocess([good, bad], tmp_path / "new" / "dir" / "out", spm_model, workers=workers, progress=False)
    assert "use --on-error skip to skip malformed lines" in str(e.value)  # the command's flag, not the keyword
    assert files(tmp_path) == ["bad.jsonl", "good.jsonl"]  # no dataset, no temp files, no new directories


def test_skip_mode_counts_and_reports_malformed_lines(small_chunks, tmp_path, spm_tokenizer, corpus_texts, capsys):
    setup_logging()
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:40], extra_lines=BAD_LINES)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    summary = preprocess([src, tmp_path / "latin1.jsonl"], tmp_path / "out", spm_tokenizer, workers=2, on_error="skip", progress=False)
    assert summary.skipped == 5 and summary.documents == 40
    assert [loc.split(": ")[0] for loc in summary.skipped_locations] == [f"{src}:{n + 1}" for n, _ in BAD_LINES] + [
        f"{tmp_path / 'latin1.jsonl'}:1"
    ]
    reasons = " | ".join(summary.skipped_locations)
    for reason in ("invalid JSON", "expected a JSON object, got list", "key 'text' missing", "'text' is int", "not valid UTF-8"):
        assert reason in reasons
    err = capsys.readouterr().err
    assert f"warning: skipping {src}:6: " in err and err.count("warning: skipping") == 5
    assert documents(tmp_path / "out") == [spm_tokenizer.encode(t) for t in corpus_texts[:40]]


class FailingTokenizer(SentencePieceTokenizer):
    """Raises on documents containing a marker (to fail in the middle of a run)."""

    error: type[BaseException] = RuntimeError

    def encode(self, text):
        if "BOOM" in text:
            raise self.error("tokenizer failed")
        return super().encode(text)


class InterruptedTokenizer(FailingTokenizer):
    error = KeyboardInterrupt


@pytest.mark.parametrize("cls,workers", [(FailingTokenizer, 2), (InterruptedTokenizer, 1)])
def test_failure_mid_run_leaves_nothing(tmp_path, spm_model, corpus_texts, cls, workers):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts + ["BOOM"] + corpus_texts)
    with pytest.raises(cls.error, match="tokenizer failed"):
        preprocess([src], tmp_path / "out", cls(spm_model), workers=workers, progress=False)
    assert files(tmp_path) == ["in.jsonl"]


SLOW_RUN = """
import sys, time
from megaevo.data.preprocess import preprocess
from megaevo.data.tokenizers import SentencePieceTokenizer

class Slow(SentencePieceTokenizer):
    def encode(self, text):
        time.sleep(0.002)
        return super().encode(text)

if __name__ == "__main__":
    preprocess([sys.argv[1]], sys.argv[2], Slow(sys.argv[3]), workers=2, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_or_killed_process_leaves_no_dataset(tmp_path, spm_model, corpus_texts, sig):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts * 20)
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(SLOW_RUN))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), str(spm_model)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("out.bin.tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run should still be writing"
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
    if sig == signal.SIGINT:  # an interrupt cleans up its temporary files as well
        assert files(tmp_path) == ["in.jsonl", "slow.py"]
        assert b"KeyboardInterrupt" in err


def test_inputs_are_checked_before_any_work(tmp_path, spm_model, corpus_texts):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_texts[:5])
    with pytest.raises(PreprocessError, match="missing.jsonl: input file not found"):
        preprocess([good, tmp_path / "missing.jsonl"], tmp_path / "sub" / "out", spm_model, progress=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("no data here\n")
    with pytest.raises(PreprocessError, match="docs: no input files in the directory"):
        preprocess([tmp_path / "docs"], tmp_path / "sub" / "out", spm_model, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        preprocess([good], tmp_path / "sub" / "out", tmp_path / "nope.model", progress=False)
    assert files(tmp_path) == ["docs", "good.jsonl"]


def test_hf_tokenizer_through_the_worker_pool(tmp_path, corpus_texts):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_texts, trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:100])
    preprocess([src], tmp_path / "out", str(tmp_path / "tokenizer.json"), workers=2, append_eod=True, progress=False)
    assert documents(tmp_path / "out") == [tok.encode(t).ids + [0] for t in corpus_texts[:100]]


def test_cli_train_preprocess_inspect(tmp_path, corpus_texts, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus_texts), encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "450", "--output", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'tok.model'}"
    src = write_jsonl(tmp_path / "docs.jsonl.gz", corpus_texts[:100], key="content")
    prefix = tmp_path / "data" / "docs"
    argv = ["preprocess", "--input", str(src), "--json-key", "content", "--tokenizer", str(tmp_path / "tok.model"),
            "--output-prefix", str(prefix), "--workers", "2", "--append-eod", "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["documents"], summary["output_prefix"]) == (100, str(prefix))
    assert main(["inspect", str(prefix), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["documents"], info["tokens"]) == (summary["documents"], summary["tokens"])
    ds = IndexedDataset(prefix)
    assert info["tokens"] == ds.num_tokens and np.all(ds.get(0)[-1:] == 2)
    assert info["max_token_id"] < 450
