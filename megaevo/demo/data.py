"""The demo's data steps, each cached by a `.done` record: corpora, tokenizer, indexed datasets."""
from __future__ import annotations


import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from megaevo.data import indexed
from megaevo.data.preprocess import preprocess
from megaevo.data.sft import preprocess_sft, sft_paths
from megaevo.data.tokenizers import train_sentencepiece
from megaevo.demo.common import sha256
from megaevo.demo.corpora import (GENERAL_BYTES, GENERAL_DOCS, MATH_DOCS, SFT_CONVERSATIONS, SFT_TASKS,
                                  TOKENIZER_MAX_SENTENCES, _reasoning_gym_version, general_corpus, math_corpus,
                                  sft_corpus)


@dataclass
class DomainResult:
    name: str
    corpus: str
    corpus_documents: int
    corpus_bytes: int
    data_prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str


def _cached(marker: Path, inputs: dict, build: Callable[[], dict], complete: Callable[[dict], bool], log) -> dict:
    """Run build() unless `marker` records the same inputs and complete(record) holds; return the record."""
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            if record.get("inputs") == inputs and complete(record):
                log(f"  reusing {marker.with_suffix('')}")
                return record
        except (ValueError, KeyError, TypeError, OSError):
            pass
        marker.unlink()
    record = {"inputs": inputs, **build()}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, marker)
    return record


def _write_jsonl(path: Path, docs: Iterable[str], total: int | None, verbose: bool, unit: str = "doc") -> dict:
    """Write `docs` as jsonl, with a progress bar towards `total` documents (unit "doc") or UTF-8
    bytes of text (unit "B"), the cap that the generator stops at. A corpus that ends short of it
    (the other cap came first, or the source ran out) closes the bar at its real end."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    by_bytes = unit == "B"
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=total, desc=path.stem, unit=unit, unit_scale=by_bytes,
                                                      disable=not verbose, leave=False) as bar:
        for doc in docs:  # a text, or a whole record
            line = json.dumps(doc if isinstance(doc, dict) else {"text": doc}, ensure_ascii=False)
            f.write(line + "\n")
            n += 1
            bar.update(len((doc if isinstance(doc, str) else line).encode("utf-8")) if by_bytes else 1)
        bar.total = bar.n
        bar.refresh()
    if n == 0:
        tmp.unlink()
        raise RuntimeError(f"{path}: the {path.stem} corpus came out empty")
    os.replace(tmp, path)
    return {"documents": n, "bytes": path.stat().st_size, "sha256": sha256(path)}


def _file_matches(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256(path) == record["sha256"]



def _make_corpora(folder: Path, seed: int, scale: float, log, verbose: bool) -> dict[str, dict]:
    """Write DIR/corpus/{general,math}.jsonl; return each one's record (path, documents, bytes, sha256)."""
    general_docs, general_bytes, math_docs = (max(1, round(x * scale)) for x in (GENERAL_DOCS, GENERAL_BYTES, MATH_DOCS))
    recipes = {
        "general": (
            {"source": "python-stdlib", "python": sys.version.split()[0], "docs": general_docs, "bytes": general_bytes},
            lambda: general_corpus(limit_docs=general_docs, max_bytes=general_bytes),
            general_bytes,  # the byte cap ends it (about 1,300 documents at scale 1), not the document cap
            "B",
        ),
        "math": (
            {"source": "reasoning-gym", "version": _reasoning_gym_version(), "docs": math_docs, "seed": seed},
            lambda: math_corpus(math_docs, seed),
            math_docs,
            "doc",
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    corpora = {}
    for name, (inputs, documents, total, unit) in recipes.items():
        path = folder / f"{name}.jsonl"
        record = _cached(
            path.with_name(path.name + ".done"),
            inputs,
            lambda: _write_jsonl(path, documents(), total, verbose, unit),
            lambda rec: _file_matches(path, rec),
            log,
        )
        log(f"  {name}: {record['documents']:,} documents, {record['bytes'] / 1e6:.1f} MB")
        corpora[name] = {"path": str(path), **record}
    return corpora


def _make_sft_corpus(path: Path, seed: int, scale: float, log, verbose: bool) -> dict:
    """Write DIR/corpus/sft.jsonl, the conversations of the SFT stage (prompt/response)."""
    n = max(1, round(SFT_CONVERSATIONS * scale))
    inputs = {"source": "reasoning-gym", "version": _reasoning_gym_version(), "tasks": SFT_TASKS, "conversations": n,
              "seed": seed}
    record = _cached(path.with_name(path.name + ".done"), inputs,
                     lambda: _write_jsonl(path, sft_corpus(n, seed), n, verbose),
                     lambda rec: _file_matches(path, rec), log)
    log(f"  sft: {record['documents']:,} conversations for fine-tuning (prompt/response)")
    return {"path": str(path), **record}


def _make_sft_dataset(prefix: Path, corpus: dict, model: Path, model_sha: str, log, verbose: bool) -> dict:
    """Encode DIR/corpus/sft.jsonl with the evolm chat template into PREFIX (`megaevo preprocess --sft`)."""
    def build() -> dict:
        summary = preprocess_sft([corpus["path"]], str(prefix), str(model), template="evolm", progress=verbose)
        log("  " + summary.describe().replace("\n", "\n  "))
        return {"documents": indexed.IndexedDataset(prefix).num_documents}

    def complete(rec: dict) -> bool:
        if not all(p.is_file() for p in sft_paths(prefix).values()):
            return False
        try:
            return indexed.IndexedDataset(prefix).num_documents == rec["documents"]
        except (indexed.DatasetFormatError, OSError):
            return False

    inputs = {"corpus": corpus["sha256"], "tokenizer": model_sha, "template": "evolm"}
    record = _cached(prefix.with_suffix(".done"), inputs, build, complete, log)
    log(f"  sft: {record['documents']:,} conversations encoded in {prefix}")
    return record


def _make_tokenizer(prefix: Path, corpora: dict[str, dict], vocab_size: int, seed: int, log) -> tuple[Path, str]:
    """Train PREFIX.model on every corpus; return its path and sha256."""
    def train() -> dict:
        model = train_sentencepiece(
            [c["path"] for c in corpora.values()],
            vocab_size,
            str(prefix),
            json_key="text",
            max_sentences=TOKENIZER_MAX_SENTENCES,
            seed=seed,
        )
        return {"model": Path(model).name, "sha256": sha256(Path(model))}

    def trained(rec: dict) -> bool:
        model = prefix.parent / rec["model"]
        return model.is_file() and sha256(model) == rec["sha256"]

    prefix.parent.mkdir(parents=True, exist_ok=True)
    inputs = {
        "corpora": {name: c["sha256"] for name, c in corpora.items()},
        "vocab_size": vocab_size,
        "seed": seed,
        "max_sentences": TOKENIZER_MAX_SENTENCES,
    }
    record = _cached(prefix.with_suffix(".done"), inputs, train, trained, log)
    return prefix.parent / record["model"], record["sha256"]


def _make_dataset(prefix: Path, corpus: dict, model: Path, model_sha: str, log, verbose: bool) -> DomainResult:
    """Tokenize one corpus into PREFIX.bin/.idx, one document per line with EOD appended."""
    def build() -> dict:
        summary = preprocess(
            [corpus["path"]],
            str(prefix),
            str(model),
            json_key="text",
            workers=1,
            append_eod=True,
            on_error="fail",
            progress=verbose,
        )
        log("  " + summary.describe().replace("\n", "\n  "))
        return {"documents": summary.documents, "tokens": summary.tokens}

    def complete(rec: dict) -> bool:
        try:
            ds = indexed.IndexedDataset(prefix)
        except indexed.DatasetFormatError:
            return False
        return (ds.num_documents, ds.num_tokens) == (rec["documents"], rec["tokens"])

    inputs = {"corpus": corpus["sha256"], "tokenizer": model_sha, "append_eod": True}
    _cached(prefix.with_suffix(".done"), inputs, build, complete, log)
    ds = indexed.IndexedDataset(prefix)
    return DomainResult(
        name=prefix.name,
        corpus=corpus["path"],
        corpus_documents=corpus["documents"],
        corpus_bytes=corpus["bytes"],
        data_prefix=str(prefix),
        documents=ds.num_documents,
        sequences=len(ds),
        tokens=ds.num_tokens,
        dtype=str(ds.dtype),
    )
