"""Time the fused kernels against their references and against torch's best, on EvoLM shapes.

    python benchmarks/fused_kernels.py [--json] [--only attention rmsnorm ...] [--tokens 16384]

Shapes: 32 heads and 4 KV heads; 1B: hidden 2048 (head_dim 64), FFN 4896, vocab 32000;
4B: hidden 4096 (head_dim 128), FFN 7792; sequences of 2048 and 4096 tokens, batch chosen so a
micro-batch holds --tokens tokens. Each row gives one implementation of one op: median time
(CUDA events via triton.testing.do_bench, after warm-up), TFLOP/s or GB/s, and its share of this
device's measured peak (a large bf16 matmul; a large device-to-device copy). The row-wise ops
(RMSNorm, SwiGLU, rotary) are also timed as CUDA-graph replays ("(CUDA graph)" rows): their
kernels take tens of microseconds, so eager timing mostly measures the host's launches, and the
bandwidth target is checked on the replays. Baselines: the
plain-torch reference, and torch's best (SDPA with the flash backend, torch.optim.AdamW with
fused=True, torch.compile of the reference norm/SwiGLU). Attention also runs with autotuning off
("triton fixed tile"), the price of bit-reproducible runs. The last rows check the targets, then
name the tile autotuning kept for each attention kernel and shape.

Prints one JSON object per line with --json, a table otherwise. Without CUDA it prints one JSON
line saying it was skipped and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

OPS = ("attention", "rmsnorm", "swiglu", "rotary", "cross_entropy", "adamw", "sum_of_squares")
MODELS = {"1B": dict(hidden=2048, ffn=4896, head_dim=64), "4B": dict(hidden=4096, ffn=7792, head_dim=128)}
HEADS, KV_HEADS, VOCAB, SEQS = 32, 4, 32000, (2048, 4096)
DEVICE = "cuda"


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    ms: float | None
    tflops: float | None = None
    gbps: float | None = None
    share_of_peak: float | None = None
    peak_mem_gib: float | None = None
    note: str = ""


@dataclass
class Peak:
    tflops: float
    gbps: float
    device: str = field(default_factory=lambda: torch.cuda.get_device_name())


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` (L2 flushed between calls)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def measure_peak() -> Peak:
    """This device's dense bf16 matmul rate and device-to-device copy bandwidth."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    tflops = 2 * 8192**3 / ms / 1e9
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return Peak(tflops=tflops, gbps=2 * src.numel() / ms / 1e6)


def bench_graph(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: the GPU's time without the host's
    launch gaps, which dominate ops whose kernels take tens of microseconds."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=50, grad_to_none=grad_to_none, return_mode="median"))


def timed(op, shape, impl, fn, *, flops=None, bytes_moved=None, peak: Peak, grad_to_none=None, graph=False) -> Row:
    """One row; failures (out of memory, unsupported) become a row with a note instead of a crash.
    With ``graph`` the time is that of CUDA-graph replays (see :func:`bench_graph`)."""
    if graph:
        impl += " (CUDA graph)"
    try:
        fn()
        ms = (bench_graph if graph else bench)(fn, grad_to_none)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
        torch.cuda.empty_cache()
        return Row(op, shape, impl, None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    row = Row(op, shape, impl, round(ms, 4))
    if flops is not None:
        row.tflops = round(flops / ms / 1e9, 1)
        row.share_of_peak = round(row.tflops / peak.tflops, 3)
    if bytes_moved is not None:
        row.gbps = round(bytes_moved / ms / 1e6, 1)
        row.share_of_peak = round(row.gbps / peak.gbps, 3)
    return row


def fwd_bwd(f, inputs, *args, **kwargs):
    """A closure running f forward and backward with a fixed output gradient."""
    out = f(*inputs, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        result = f(*inputs, *args, **kwargs)
        torch.autograd.backward(result if isinstance(result, tuple) else (result,), grads)

    return run


def fixed_tile(f):
    """``f`` run with autotuning off: the kernels launch their fixed (first-listed) tiles."""
    from megaevo.kernels import autotune_enabled, set_autotune

    def run(*args, **kwargs):
        before = autotune_enabled()
        set_autotune(False)
        try:
            return f(*args, **kwargs)
        finally:
            set_autotune(before)

    return run


def bench_attention(peak, tokens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megaevo.kernels import flash_attention, flash_attention_reference

    rows = []
    for name, model in MODELS.items():
        for seq in SEQS:
            batch, dim = max(1, tokens // seq), model["head_dim"]
            shape = f"{name} b{batch} s{seq} h{HEADS}/{KV_HEADS} d{dim} causal"
            q = torch.randn(batch, seq, HEADS, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(batch, seq, KV_HEADS, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            flops = 4 * batch * HEADS * seq * seq * dim / 2 * 3.5  # causal; backward = 2.5 x forward
            ins = (q, k, v)
            # SDPA's flash kernel gets K/V already repeated per query head (its fastest GQA path)
            k_rep, v_rep = (t.detach().repeat_interleave(HEADS // KV_HEADS, 2).requires_grad_() for t in (k, v))
            sdpa_ins = (q, k_rep, v_rep)

            def sdpa_flash(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                          is_causal=True).transpose(1, 2)

            rows.append(timed("attention fwd+bwd", shape, "triton", fwd_bwd(
                lambda *t: flash_attention(*t, backend="triton"), ins), flops=flops, peak=peak, grad_to_none=ins))
            rows.append(timed("attention fwd+bwd", shape, "triton fixed tile", fwd_bwd(
                fixed_tile(lambda *t: flash_attention(*t, backend="triton")), ins), flops=flops, peak=peak,
                grad_to_none=ins))
            rows.append(timed("attention fwd+bwd", shape, "sdpa-flash", fwd_bwd(sdpa_flash, sdpa_ins),
                              flops=flops, peak=peak, grad_to_none=sdpa_ins))
            with torch.no_grad():
                rows.append(timed("attention fwd", shape, "triton",
                                  lambda: flash_attention(q, k, v, backend="triton"), flops=flops / 3.5, peak=peak))
                rows.append(timed("attention fwd", shape, "sdpa-flash", lambda: sdpa_flash(*sdpa_ins),
                                  flops=flops / 3.5, peak=peak))
            if batch * HEADS * seq * seq * 4 <= 8 << 30:
                rows.append(timed("attention fwd+bwd", shape, "reference", fwd_bwd(flash_attention_reference, ins),
                                  flops=flops, peak=peak, grad_to_none=ins))
            del q, k, v, ins, k_rep, v_rep, sdpa_ins
            torch.cuda.empty_cache()
    return rows


def bench_rowwise(peak, tokens):
    """RMSNorm and SwiGLU forward + backward: triton, eager reference, torch.compile'd reference."""
    from megaevo.kernels import rms_norm, rms_norm_reference, swiglu, swiglu_reference

    rows = []
    compiled_norm = torch.compile(rms_norm_reference)
    compiled_swiglu = torch.compile(swiglu_reference)
    for name, model in MODELS.items():
        x = torch.randn(tokens, model["hidden"], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(model["hidden"], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        shape = f"{name} {tokens}x{model['hidden']} bf16"
        moved = 5 * x.numel() * 2  # fwd: read x, write y; bwd: read x, dy, write dx
        for (impl, f), graph in itertools.product(
                (("triton", lambda a, b: rms_norm(a, b, backend="triton")), ("reference", rms_norm_reference),
                 ("torch.compile", compiled_norm)), (False, True)):
            rows.append(timed("rmsnorm fwd+bwd", shape, impl, fwd_bwd(f, (x, w)), bytes_moved=moved, peak=peak,
                              grad_to_none=(x, w), graph=graph))
        g = torch.randn(tokens, model["ffn"], device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        u = torch.randn_like(g, requires_grad=True)
        shape = f"{name} {tokens}x{model['ffn']} bf16"
        moved = 8 * g.numel() * 2  # fwd: read 2, write 1; bwd: read 3, write 2
        for (impl, f), graph in itertools.product(
                (("triton", lambda a, b: swiglu(a, b, backend="triton")), ("reference", swiglu_reference),
                 ("torch.compile", compiled_swiglu)), (False, True)):
            rows.append(timed("swiglu fwd+bwd", shape, impl, fwd_bwd(f, (g, u)), bytes_moved=moved, peak=peak,
                              grad_to_none=(g, u), graph=graph))
    return rows


def bench_rotary(peak, tokens):
    from megaevo.kernels import apply_rotary, apply_rotary_reference, rotary_tables

    rows = []
    for name, model in MODELS.items():
        seq, dim = max(SEQS), model["head_dim"]
        batch = max(1, tokens // seq)
        cos, sin = rotary_tables(dim, seq, device=DEVICE)
        q = torch.randn(batch, seq, HEADS, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, seq, KV_HEADS, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        moved = 4 * (q.numel() + k.numel()) * 2
        shape = f"{name} b{batch} s{seq} d{dim} bf16"
        for (impl, f), graph in itertools.product(
                (("triton", lambda a, b: apply_rotary(a, b, cos, sin, backend="triton")),
                 ("reference", lambda a, b: apply_rotary_reference(a, b, cos, sin))), (False, True)):
            rows.append(timed("rotary fwd+bwd", shape, impl, fwd_bwd(f, (q, k)), bytes_moved=moved, peak=peak,
                              grad_to_none=(q, k), graph=graph))
    return rows


def peak_memory(fn) -> float:
    """GiB allocated by ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_cross_entropy(peak, tokens):
    from megaevo.kernels import cross_entropy, cross_entropy_reference

    logits = torch.randn(tokens, VOCAB, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, VOCAB, (tokens,), device=DEVICE)
    shape = f"{tokens}x{VOCAB} bf16"
    moved = 3 * logits.numel() * 2  # forward reads, backward reads and writes the gradient
    impls = {
        "triton": lambda x: cross_entropy(x, target, backend="triton"),
        "reference": lambda x: cross_entropy_reference(x, target),
        "F.cross_entropy fp32": lambda x: F.cross_entropy(x.float(), target, reduction="none"),
    }
    rows = []
    for impl, f in impls.items():
        run = fwd_bwd(f, (logits,))
        row = timed("cross_entropy fwd+bwd", shape, impl, run, bytes_moved=moved, peak=peak, grad_to_none=(logits,))
        logits.grad = None
        row.peak_mem_gib = round(peak_memory(run), 3)
        logits.grad = None
        rows.append(row)
    return rows


def bench_adamw(peak, n):
    from megaevo.kernels import adamw_step, adamw_step_reference, sum_of_squares, sum_of_squares_reference

    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)
    shape = f"{n / 1e9:.2f}B params fp32 (+bf16 copy)"
    params, grads, m = (torch.randn(n, device=DEVICE) for _ in range(3))
    v = torch.rand(n, device=DEVICE)
    out = torch.empty(n, device=DEVICE, dtype=torch.bfloat16)
    moved = 28 * n
    rows = [
        timed("adamw step", shape, "triton", lambda: adamw_step(params, grads, m, v, **hyper, out=out, backend="triton"),
              bytes_moved=moved, peak=peak),
        timed("adamw step", shape, "reference", lambda: adamw_step_reference(params, grads, m, v, **hyper, out=out),
              bytes_moved=moved, peak=peak),
        timed("sum_of_squares", f"{n / 1e9:.2f}B fp32", "triton", lambda: sum_of_squares(grads, backend="triton"),
              bytes_moved=4 * n, peak=peak),
        timed("sum_of_squares", f"{n / 1e9:.2f}B fp32", "reference", lambda: sum_of_squares_reference(grads),
              bytes_moved=4 * n, peak=peak),
    ]
    del m, v, out
    param = torch.nn.Parameter(params)
    param.grad = grads
    opt = torch.optim.AdamW([param], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    rows.append(timed("adamw step", shape, "torch fused AdamW", opt.step, bytes_moved=moved, peak=peak))
    rows[-1].note = "no bf16 copy"
    return rows


def chosen_tiles() -> list[dict]:
    """The tile autotuning kept for each attention kernel and key, beside the fixed one."""
    from megaevo.kernels.jit import attention

    found = []
    for kernel, tuner in getattr(attention, "_AUTOTUNED", {}).items():
        for key, config in getattr(tuner, "cache", {}).items():
            head_dim = key[1] if len(key) > 1 and isinstance(key[1], int) else None
            tile = [config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N"), config.num_warps, config.num_stages]
            fixed = list(attention.candidate_tiles(kernel, head_dim)[0]) if head_dim else None
            found.append(dict(tile_choice=kernel, key=[str(k) for k in key], chosen=tile, fixed=fixed))
    return found


def targets(rows: list[Row]) -> list[dict]:
    """The issue's H100 targets, checked on whatever device this ran on."""
    def find(op, impl, shape=None):
        return [r for r in rows if r.op == op and r.impl == impl and (shape is None or r.shape == shape)]

    checks = []
    for r in find("attention fwd+bwd", "triton"):
        base = find("attention fwd+bwd", "sdpa-flash", r.shape)
        if r.ms and base and base[0].ms:
            speedup = base[0].ms / r.ms
            checks.append(dict(target=f"attention fwd+bwd >= 1.1x sdpa-flash [{r.shape}]", value=round(speedup, 3),
                               met=speedup >= 1.1))
    for r in find("adamw step", "triton"):
        fused = find("adamw step", "torch fused AdamW")
        if r.ms:
            checks.append(dict(target="adamw >= 80% of HBM bandwidth", value=r.share_of_peak, met=r.share_of_peak >= 0.8))
        if r.ms and fused and fused[0].ms:
            checks.append(dict(target="adamw faster than torch fused AdamW", value=round(fused[0].ms / r.ms, 3),
                               met=r.ms < fused[0].ms))
    # a bandwidth target is the kernels' own: judged on CUDA-graph replays, without launch gaps
    for r in find("rmsnorm fwd+bwd", "triton (CUDA graph)"):
        if r.ms:
            checks.append(dict(target=f"rmsnorm fwd+bwd >= 80% of HBM bandwidth [{r.shape}]", value=r.share_of_peak,
                               met=r.share_of_peak >= 0.8))
    ours, theirs = find("cross_entropy fwd+bwd", "triton"), find("cross_entropy fwd+bwd", "F.cross_entropy fp32")
    if ours and theirs and ours[0].peak_mem_gib is not None and theirs[0].peak_mem_gib:
        ratio = ours[0].peak_mem_gib / theirs[0].peak_mem_gib
        checks.append(dict(target="cross_entropy peak memory <= 1/4 of F.cross_entropy on fp32 logits",
                           value=round(ratio, 3), met=ratio <= 0.25))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--only", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (batch = tokens // seq)")
    p.add_argument("--adamw-params", type=float, default=1e9)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "kernels", "skipped": True, "reason": "no CUDA device"}))
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print(json.dumps({"benchmark": "kernels", "skipped": True, "reason": "triton is not installed"}))
        return 0

    peak = measure_peak()
    rows: list[Row] = []
    if "attention" in args.only:
        rows += bench_attention(peak, args.tokens)
    if "rmsnorm" in args.only or "swiglu" in args.only:
        rows += [r for r in bench_rowwise(peak, args.tokens) if r.op.split()[0] in args.only]
    if "rotary" in args.only:
        rows += bench_rotary(peak, args.tokens)
    if "cross_entropy" in args.only:
        rows += bench_cross_entropy(peak, args.tokens)
    if "adamw" in args.only or "sum_of_squares" in args.only:
        rows += [r for r in bench_adamw(peak, int(args.adamw_params))
                 if ("adamw" if r.op.startswith("adamw") else "sum_of_squares") in args.only]
    checks = targets(rows)

    report(peak, rows, checks, args.json)
    for choice in chosen_tiles():
        print(json.dumps({"benchmark": "kernels", **choice}) if args.json else
              f"autotuned {choice['tile_choice']:4} {' '.join(choice['key']):40} chose {choice['chosen']} "
              f"(fixed {choice['fixed']})")
    return 0


def report(peak: Peak, rows: list[Row], checks: list[dict], as_json: bool) -> None:
    """Print the rows and target checks, as JSON lines or as a table."""
    if as_json:
        print(json.dumps({"benchmark": "kernels", "device": peak.device, "peak_tflops": round(peak.tflops, 1),
                          "peak_gbps": round(peak.gbps, 1), "torch": torch.__version__}))
        for r in rows:
            print(json.dumps({"benchmark": "kernels", **asdict(r)}))
        for c in checks:
            print(json.dumps({"benchmark": "kernels", **c}))
        return
    print(f"{peak.device}: measured peak {peak.tflops:.0f} TFLOP/s bf16, {peak.gbps:.0f} GB/s")
    print(f"{'op':22} {'shape':36} {'impl':20} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'peak%':>6} {'GiB':>6}")
    for r in rows:
        cells = [f"{r.ms:>9.3f}" if r.ms is not None else f"{'-':>9}"]
        cells += [f"{x:>8.1f}" if x is not None else f"{'':>8}" for x in (r.tflops, r.gbps)]
        cells += [f"{100 * r.share_of_peak:>6.1f}" if r.share_of_peak is not None else f"{'':>6}"]
        cells += [f"{r.peak_mem_gib:>6.2f}" if r.peak_mem_gib is not None else f"{'':>6}"]
        print(f"{r.op:22} {r.shape:36} {r.impl:20} {' '.join(cells)} {r.note}")
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'} {c['target']}: {c['value']}")


if __name__ == "__main__":
    sys.exit(main())
