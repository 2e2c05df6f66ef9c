"""Time the Triton RMSNorm under a grid of launch configurations, to choose ``launch_config``.

    python benchmarks/rmsnorm_configs.py [--hidden 2048 4096] [--tokens 16384]

Each row: rows per program and warps (forward and backward alike), backward programs per SM,
the forward's and the forward + backward's median time and GB/s (5 passes over the activations,
as in benchmarks/fused_kernels.py), timed as CUDA-graph replays so that the host's launch gaps do not
hide the kernels' differences. The row marked "default" is what ``launch_config`` picks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "rmsnorm_configs", "skipped": True, "reason": "no CUDA device"}))
        return 0
    from triton.testing import do_bench_cudagraph

    from megaevo.kernels.jit import num_sms, rmsnorm

    default = rmsnorm.launch_config
    sms = num_sms(torch.device("cuda"))
    best = {}
    for hidden in args.hidden:
        x = torch.randn(args.tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        base = default(hidden, sms)
        grid = [(base["rows"], base["warps"], base["programs"] // sms)] + list(itertools.product((1, 2, 4, 8), (4, 8, 16), (1, 2, 4)))
        for rows, warps, per_sm in grid:
            if rows * base["block"] > 32768:
                continue
            cfg = dict(base, rows=rows, warps=warps, programs=per_sm * sms)
            rmsnorm.launch_config = lambda n, s, cfg=cfg: cfg

            def fwd():
                return rmsnorm.RMSNormFunction.apply(x, w, 1e-6)

            def fwd_bwd():
                torch.autograd.backward(fwd(), dy)

            with torch.no_grad():
                t_fwd = float(do_bench_cudagraph(fwd, rep=20, return_mode="median"))
            t_all = float(do_bench_cudagraph(fwd_bwd, rep=20, grad_to_none=(x, w), return_mode="median"))
            row = dict(benchmark="rmsnorm_configs", hidden=hidden, rows=rows, warps=warps, programs_per_sm=per_sm,
                       default=(rows, warps, per_sm) == grid[0], fwd_ms=round(t_fwd, 4), fwd_bwd_ms=round(t_all, 4),
                       fwd_bwd_gbps=round(5 * x.numel() * 2 / t_all / 1e6, 1))
            print(json.dumps(row), flush=True)
            if hidden not in best or t_all < best[hidden]["fwd_bwd_ms"]:
                best[hidden] = row
        rmsnorm.launch_config = default
    for hidden, row in best.items():
        print(f"hidden {hidden}: fastest rows={row['rows']} warps={row['warps']} programs/SM={row['programs_per_sm']} "
              f"{row['fwd_bwd_ms']:.3f} ms {row['fwd_bwd_gbps']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
