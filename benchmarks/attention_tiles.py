"""Time every attention tile of a grid on this GPU, per kernel, to choose the tile lists.

    python benchmarks/attention_tiles.py [--dims 64 128] [--seq 2048] [--tokens 16384] [--workers 12]

For each head dim, each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, the
dK/dV and the dQ kernel is first compiled and checked against the float32 reference by a pool of
worker processes (which fills Triton's on-disk cache), then timed alone in this process: the
forward on its own, each backward kernel inside a full backward whose other kernel keeps its fixed
tile, so that times rank tiles of one kernel. Tiles that fail to compile, run out of shared
memory or give wrong results are reported as such. Prints one JSON line per tile, then the
fastest few per kernel and head dim. Causal, 32 query heads and 4 KV heads, bf16.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

HEADS, KV_HEADS = 32, 4
MAX_ERR = 2e-2  # relative error against the float32 reference above which a tile counts as wrong
GRID = {
    # (BLOCK_M, BLOCK_N): queries x keys per step
    "fwd": dict(blocks=[(64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)], warps=(4, 8), stages=(2, 3, 4)),
    "dkdv": dict(blocks=[(16, 64), (16, 128), (32, 32), (32, 64), (32, 128), (64, 32), (64, 64), (64, 128),
                         (128, 64), (128, 128)], warps=(4, 8), stages=(2, 3, 4)),
    "dq": dict(blocks=[(32, 64), (64, 32), (64, 64), (64, 128), (128, 16), (128, 32), (128, 64), (128, 128)],
               warps=(4, 8), stages=(2, 3, 4)),
}


def candidates(kernel: str, warps=None, stages=None) -> list[tuple[int, int, int, int]]:
    g = GRID[kernel]
    return [(m, n, w, s) for (m, n), w, s in itertools.product(g["blocks"], warps or g["warps"], stages or g["stages"])]


def inputs(dim: int, seq: int, tokens: int, seed: int = 0):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = max(1, tokens // seq)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v = rand(batch, seq, HEADS, dim), rand(batch, seq, KV_HEADS, dim), rand(batch, seq, KV_HEADS, dim)
    do = rand(batch, seq, HEADS, dim)
    return q, k, v, do


def run_tile(kernel, tile, q, k, v, do, fixed):
    """Forward, or backward with ``tile`` for ``kernel`` and the fixed tile for the other one."""
    from megaevo.kernels.jit.attention import attention_backward, attention_forward

    scale = q.shape[-1] ** -0.5
    if kernel == "fwd":
        return lambda: attention_forward(q, k, v, True, scale, None, tile=tile)
    out, lse = attention_forward(q, k, v, True, scale, None, tile=fixed["fwd"])
    tiles = (tile, fixed["dq"]) if kernel == "dkdv" else (fixed["dkdv"], tile)
    return lambda: attention_backward(do, q, k, v, out, lse, True, scale, None, tiles=tiles)


def check(job):
    """Compile and run one tile on a small problem; the error against the float32 reference."""
    kernel, tile, dim = job
    os.environ.setdefault("MEGAEVO_KERNEL_AUTOTUNE", "0")
    import torch

    from megaevo.kernels import flash_attention_reference
    from megaevo.kernels.jit.attention import candidate_tiles

    fixed = {name: candidate_tiles(name, dim)[0] for name in ("fwd", "dkdv", "dq")}
    q, k, v, do = inputs(dim, 1000, 2000, seed=1)  # a length no block size divides
    try:
        result = run_tile(kernel, tile, q, k, v, do, fixed)()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a tile that cannot run is a result too
        return dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = flash_attention_reference(qf, kf, vf, causal=True)
    if kernel == "fwd":
        got, want = [result[0]], [ref]
    else:
        got, want = list(result), list(torch.autograd.grad(ref, (qf, kf, vf), do.float()))
    err = max(((g.float() - w).norm() / w.norm()).item() for g, w in zip(got, want))
    return dict(rel_err=err)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kernels", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--warps", type=int, nargs="+", help="only these num_warps")
    p.add_argument("--stages", type=int, nargs="+", help="only these num_stages")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    os.environ["MEGAEVO_KERNEL_AUTOTUNE"] = "0"

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "attention_tiles", "skipped": True, "reason": "no CUDA device"}))
        return 0
    from triton.testing import do_bench

    from megaevo.kernels.jit.attention import candidate_tiles

    jobs = [(kernel, tile, dim) for dim in args.dims for kernel in args.kernels
            for tile in candidates(kernel, args.warps, args.stages)]
    checked = {}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, (job, result) in enumerate(zip(jobs, pool.map(check, jobs)), 1):
            checked[job] = result
            print(f"\r{i}/{len(jobs)} tiles compiled and checked", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(json.dumps({"benchmark": "attention_tiles", "checked": len(jobs),
                      "failed": sum("error" in c for c in checked.values())}), flush=True)

    results = []
    for dim in args.dims:
        fixed = {name: candidate_tiles(name, dim)[0] for name in ("fwd", "dkdv", "dq")}
        q, k, v, do = inputs(dim, args.seq, args.tokens)
        for kernel in args.kernels:
            for tile in candidates(kernel, args.warps, args.stages):
                row = dict(benchmark="attention_tiles", dim=dim, seq=args.seq, kernel=kernel, tile=list(tile),
                           listed=tile in candidate_tiles(kernel, dim), **checked[(kernel, tile, dim)])
                if "error" not in row and row["rel_err"] >= MAX_ERR:
                    row["error"] = f"wrong result: relative error {row['rel_err']:.3g} >= {MAX_ERR}"
                if "error" not in row:
                    fn = run_tile(kernel, tile, q, k, v, do, fixed)
                    row["ms"] = round(float(do_bench(fn, warmup=10, rep=40, return_mode="median")), 4)
                results.append(row)
                print(json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    for dim in args.dims:
        for kernel in args.kernels:
            timed = sorted((r for r in results if r["dim"] == dim and r["kernel"] == kernel and "ms" in r),
                           key=lambda r: r["ms"])
            best = ", ".join(f"{tuple(r['tile'])}{'*' if r['listed'] else ''} {r['ms']:.3f}" for r in timed[:args.top])
            print(f"d{dim} {kernel:4}: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
