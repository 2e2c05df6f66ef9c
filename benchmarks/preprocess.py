"""Time `megaevo preprocess` on a generated corpus in several input formats at several worker counts.

    python benchmarks/preprocess.py --docs 20000 --workers 1 2 --formats jsonl jsonl.zst parquet --json

Generates seeded pseudo-English documents (jsonl), writes them also as .jsonl.zst and parquet (formats
whose optional package is missing are skipped with a note), trains a small SentencePiece tokenizer on
them unless --tokenizer is given, tokenizes the corpus once per format and worker count, and prints one
result per line (JSON objects with --json): tokens/s, and tokens/s per core (per tokenizer process).
Also checks that every format and worker count wrote identical bytes.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import sys
import tempfile
from pathlib import Path

from megaevo.data.preprocess import preprocess
from megaevo.data.tokenizers import train_sentencepiece

ONSETS = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "pl", "ch", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "io"]
CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]


def make_corpus(path: Path, docs: int, seed: int) -> int:
    """Write `docs` jsonl documents of pseudo-English (Zipf-distributed words); return the bytes written."""
    rng = random.Random(seed)
    words = []
    while len(words) < 5000:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        words.append(w)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            paragraphs = []
            for _ in range(rng.randint(1, 4)):
                sentences = []
                for _ in range(rng.randint(2, 6)):
                    s = " ".join(rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 18)))
                    sentences.append(s.capitalize() + rng.choice(".!?.."))
                paragraphs.append(" ".join(sentences))
            line = json.dumps({"id": i, "text": "\n\n".join(paragraphs)}) + "\n"
            size += f.write(line)
    return size


FORMATS = {"jsonl": None, "jsonl.zst": "zstandard", "parquet": "pyarrow"}


def convert(corpus: Path, fmt: str) -> Path:
    """The corpus written as ``fmt`` beside it (parquet in row groups of 1,000 documents)."""
    if fmt == "jsonl":
        return corpus
    out = corpus.with_name("corpus." + fmt)
    if fmt == "jsonl.zst":
        import zstandard

        with open(corpus, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), out, row_group_size=1000)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20_000, help="documents to generate")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="input formats to time")
    p.add_argument("--tokenizer", help="a SentencePiece .model or tokenizer.json (default: train one, vocab --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        corpus_bytes = make_corpus(corpus, args.docs, args.seed)
        tokenizer = args.tokenizer or str(
            train_sentencepiece([str(corpus)], args.vocab_size, str(work / "tok"), max_sentences=20_000, seed=args.seed)
        )
        outputs = set()
        for fmt in args.formats:
            if FORMATS[fmt] and importlib.util.find_spec(FORMATS[fmt]) is None:
                print(f"note: skipping {fmt}: the optional package {FORMATS[fmt]!r} is not installed", file=sys.stderr)
                continue
            source = convert(corpus, fmt)
            for workers in args.workers:
                prefix = work / f"out-{fmt}-w{workers}"
                s = preprocess([source], prefix, tokenizer, workers=workers, append_eod=True, progress=False)
                outputs.add((Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()))
                row = {
                    "impl": "megaevo.preprocess",
                    "format": fmt,
                    "workers": workers,
                    "documents": s.documents,
                    "tokens": s.tokens,
                    "input_bytes": corpus_bytes,
                    "file_bytes": source.stat().st_size,
                    "seconds": s.seconds,
                    "docs_per_s": s.docs_per_s,
                    "tokens_per_s": s.tokens_per_s,
                    "tokens_per_s_per_core": round(s.tokens_per_s / workers, 1),
                    "tokens_per_s_per_worker": round(s.tokens_per_s / workers, 1),
                    "identical_across_formats_and_workers": len(outputs) == 1,
                }
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(
                        f"{fmt:<10} workers={workers:<3} docs={s.documents:,} tokens={s.tokens:,} {s.seconds:.2f}s "
                        f"{s.tokens_per_s:,.0f} tokens/s ({row['tokens_per_s_per_core']:,.0f} per core)",
                        flush=True,
                    )
    if len(outputs) > 1:
        print("error: outputs differ between formats or worker counts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
