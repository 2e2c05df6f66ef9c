"""Time the document, sample and shuffle index builders on a synthetic corpus.

    python benchmarks/data_index.py --tokens 1e11 --seq-len 2048 [--impl cpp numpy] [--json]

Document lengths are drawn log-normally (mean about 1,000 tokens, a long tail, like web text).
Prints one JSON object per line and implementation: impl, tokens, documents, samples, seconds, and
the time of each index. With --blend, also times a blending index over the same number of samples.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from megaevo.data.indices import build_blending_indices, build_gpt_indices


def synthetic_sizes(tokens: float, mean: float = 1000.0, sigma: float = 1.1, seed: int = 0) -> np.ndarray:
    """Document lengths (int32) summing to about `tokens`."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean) - sigma**2 / 2
    n = max(1, int(tokens / mean))
    sizes = np.empty(n, dtype=np.int32)
    chunk = 1 << 24
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        sizes[i : i + m] = np.clip(rng.lognormal(mu, sigma, m), 1, 1 << 20).astype(np.int32)
    return sizes


def run(sizes: np.ndarray, seq_len: int, impl: str, seed: int, blend: bool) -> dict:
    documents = np.arange(len(sizes), dtype=np.int32)
    t0 = time.perf_counter()
    idx = build_gpt_indices(sizes, documents, seq_len, None, seed, impl=impl)
    seconds = time.perf_counter() - t0
    result = {
        "impl": impl,
        "tokens": int(idx.plan.tokens_per_epoch),
        "documents": len(sizes),
        "seq_len": seq_len,
        "samples": int(idx.shuffle_index.shape[0]),
        "seconds": round(seconds, 3),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cpus",
    }
    if blend:
        t0 = time.perf_counter()
        build_blending_indices([0.95, 0.05], result["samples"], impl=impl)
        result["blend_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e11)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--impl", nargs="+", default=["cpp", "numpy"], choices=["cpp", "numpy"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--blend", action="store_true", help="also time a 95/5 blending index (numpy: slow)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default output is JSON too)")
    args = p.parse_args()
    sizes = synthetic_sizes(args.tokens)
    for impl in args.impl:
        print(json.dumps(run(sizes, args.seq_len, impl, args.seed, args.blend and impl == "cpp")), flush=True)


if __name__ == "__main__":
    main()
