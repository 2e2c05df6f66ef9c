"""Registers, spills and shared memory of the attention kernels per tile, compiled for a GPU
architecture without needing that GPU.

    python benchmarks/kernel_resources.py [--json] [--arch 90] [--head-dims 64 128 256] [--sweep]

Each tile that the attention kernels may launch (``TILES`` in ``megaevo/kernels/jit/attention.py``:
what autotuning chooses from, first entry = the fixed tile used with autotuning off) is compiled
by Triton for ``sm_<arch>`` and assembled with ``ptxas -v``, for the causal mask with and without
document ids, in bf16. A row gives the registers per thread, the bytes of spill stores plus
loads, and the static shared memory, and whether that fits one block's limit. ``--sweep``
compiles every (BLOCK_M, BLOCK_N, warps) of a grid instead, to look for tiles worth adding.

Runs on a CPU (Triton compiles ahead of time; only ptxas is needed, and Triton ships one).
Registers and spills come from this Triton's code generation: another Triton version can differ.
Spills are a hint, not a verdict: on an H100 some listed four-warp backward tiles that spill here
were the fastest measured (`benchmarks/attention_tiles.py` times tiles on a GPU).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FLOAT32_POINTERS = {"LSE", "DELTA"}
SCALARS = {"qk_scale", "sm_scale"}
SPILL_NOTE = 200  # bytes; the summary counts listed tiles whose causal kernel spills more


@dataclass
class Row:
    kernel: str
    head_dim: int
    mask: str
    tile: list[int]
    listed: bool
    fixed: bool
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    fits_shared: bool | None = None
    compile_s: float | None = None
    note: str = ""


def ptxas_candidates(explicit: str | None) -> list[str]:
    """ptxas binaries to try, newest first: the one asked for, Triton's own, the PATH's."""
    if explicit:
        return [explicit]
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    found = [os.path.join(here, name) for name in ("ptxas-blackwell", "ptxas")]
    found += [p for p in (shutil.which("ptxas"),) if p]
    return [p for p in found if os.path.exists(p)]


def signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*bf16"
        elif name in FLOAT32_POINTERS:
            sig[name] = "*fp32"
        elif name == "DOC":
            sig[name] = "*i32"
        elif name in SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def assemble(ptx: str, arch: int, ptxas: list[str]) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v``; the first ptxas that accepts the PTX wins."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    try:
        for binary in ptxas:
            done = subprocess.run([binary, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                regs = re.search(r"Used (\d+) registers", done.stderr)
                spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)
                return int(regs.group(1)) if regs else 0, sum(map(int, spills))
            errors.append(f"{os.path.basename(binary)}: {done.stderr.strip().splitlines()[-1:]}")
    finally:
        os.unlink(f.name)
    raise RuntimeError("; ".join(errors) or "no ptxas found")


def measure(kernel: str, head_dim: int, doc: bool, tile, arch: int, ptxas: list[str], listed: bool,
            fixed: bool) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megaevo.kernels.jit import attention

    block_m, block_n, warps, stages = tile
    row = Row(kernel, head_dim, "causal+doc" if doc else "causal", list(tile), listed, fixed)
    fn = attention._KERNELS[kernel]
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, HAS_DOC=doc, PREC="tf32")
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, consts), constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32 if arch < 90 else 128),
                                  options=dict(num_warps=warps, num_stages=stages))
        row.registers, row.spill_bytes = assemble(compiled.asm["ptx"], arch, ptxas)
        row.shared_bytes = int(compiled.metadata.shared)
        row.fits_shared = row.shared_bytes <= SHARED_LIMIT.get(arch, 227 * 1024)
    except Exception as exc:  # noqa: BLE001 - a report row says what failed and the sweep goes on
        row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    row.compile_s = round(time.perf_counter() - start, 2)
    return row


def plan(head_dims, sweep: bool, kernels) -> list[tuple[str, int, tuple, bool, bool]]:
    from megaevo.kernels.jit.attention import candidate_tiles

    jobs = []
    for kernel in kernels:
        for dim in head_dims:
            listed = candidate_tiles(kernel, dim)
            tiles = listed
            if sweep:
                grid = itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (4, 8), (2 if dim > 128 else 3,))
                tiles = [t for t in grid if 1024 <= t[0] * t[1] <= 8192]
            jobs += [(kernel, dim, tuple(t), tuple(t) in listed, tuple(t) == listed[0]) for t in tiles]
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--arch", type=int, default=90, help="compute capability times ten (90 = H100/H200)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--kernels", nargs="+", choices=("fwd", "dkdv", "dq"), default=["fwd", "dkdv", "dq"])
    p.add_argument("--no-doc", action="store_true", help="only the causal mask, not causal + document ids")
    p.add_argument("--sweep", action="store_true", help="a grid of tiles instead of the listed ones")
    p.add_argument("--ptxas", help="the ptxas to use (default: Triton's own, then the PATH's)")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        print(json.dumps({"skipped": f"needs triton with its NVIDIA backend: {exc}"}))
        return 0
    ptxas = ptxas_candidates(args.ptxas)
    if not ptxas:
        print(json.dumps({"skipped": "no ptxas found (Triton's own or on PATH); pass --ptxas"}))
        return 0
    rows = []
    jobs = plan(args.head_dims, args.sweep, args.kernels)
    for i, (kernel, dim, tile, listed, fixed) in enumerate(jobs, 1):
        for doc in (False,) if args.no_doc else (False, True):
            row = measure(kernel, dim, doc, tile, args.arch, ptxas, listed, fixed)
            rows.append(row)
            if args.json:
                print(json.dumps(asdict(row)), flush=True)
        if not args.json:
            print(f"\r{i}/{len(jobs)} tiles compiled", end="", file=sys.stderr, flush=True)
    listed_rows = [r for r in rows if r.listed and r.registers is not None]
    summary = {
        "summary": True, "arch": args.arch, "rows": len(rows),
        "failed": sum(r.registers is None for r in rows),
        f"listed_spilling_over_{SPILL_NOTE}B": sum(r.spill_bytes > SPILL_NOTE for r in listed_rows
                                                   if r.mask == "causal"),
        "listed_over_shared_limit": sum(not r.fits_shared for r in listed_rows),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(file=sys.stderr)
    print(f"{'kernel':6} {'dim':>4} {'mask':11} {'tile (M,N,warps,stages)':24} {'regs':>5} {'spill B':>8} "
          f"{'smem KiB':>9}  listed")
    for r in rows:
        tile = str(tuple(r.tile))
        mark = "fixed" if r.fixed else "yes" if r.listed else ""
        if r.registers is None:
            print(f"{r.kernel:6} {r.head_dim:>4} {r.mask:11} {tile:24} {r.note}")
            continue
        print(f"{r.kernel:6} {r.head_dim:>4} {r.mask:11} {tile:24} {r.registers:>5} {r.spill_bytes:>8} "
              f"{r.shared_bytes / 1024:>9.1f}  {mark}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
