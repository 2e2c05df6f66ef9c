"""Check the planner's memory terms (megaevo.plan) against what real model chunks hold, on the CPU.

    python benchmarks/plan_check.py --json            # the default layouts, tiny and 100m shapes
    python benchmarks/plan_check.py --shapes tiny     # only the tiny shape

For each layout, gloo processes (one per rank; TP x PP x DP of them) build their model chunks,
flat buffers and distributed AdamW exactly as a training run does (fp32, plain-torch kernels), then
run one micro-batch forward through every chunk with autograd's saved-tensor hooks counting the
bytes kept for backward (each storage once, parameters left out). Every rank compares its bytes of
parameters, gradients (fp32 main grads), optimizer state (master weights and Adam moments) and
saved activations (per micro-batch, all of its chunks) with the estimate for its pipeline rank; a
row reports the rank where they differ most. Parameters, gradients and optimizer state must match
exactly, activations within 10%.

Prints one JSON row per layout and term: ``layout``, ``term``, ``estimate_bytes``, ``measured_bytes``,
``ratio``, ``rank``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
import tempfile
import traceback

SHAPES = {
    "tiny": dict(preset="tiny"),
    # a ~100M-parameter Llama shape
    "100m": dict(num_layers=8, hidden_size=768, ffn_hidden_size=2048, num_heads=12, num_kv_heads=4,
                 vocab_size=32000, max_seq_len=256),
}
# (name, tp, pp, dp, virtual_pp, recompute, distributed optimizer, sequence parallel)
LAYOUTS = [
    ("tp1-pp1-dp1", 1, 1, 1, 1, "none", False, False),
    ("tp1-pp1-dp1-selective", 1, 1, 1, 1, "selective", False, False),
    ("tp1-pp1-dp1-full", 1, 1, 1, 1, "full", False, False),
    ("tp2-pp1-dp1", 2, 1, 1, 1, "none", False, False),
    ("tp2-pp1-dp1-sp", 2, 1, 1, 1, "none", False, True),
    ("tp1-pp2-dp1", 1, 2, 1, 1, "none", False, False),
    ("tp1-pp2-dp1-vpp2", 1, 2, 1, 2, "none", False, False),
    ("tp1-pp1-dp2", 1, 1, 2, 1, "none", False, False),
    ("tp1-pp1-dp2-zero1", 1, 1, 2, 1, "none", True, False),
    ("tp2-pp2-dp2-zero1-sp-selective", 2, 2, 2, 1, "selective", True, True),
]
TERMS = ("params", "grads", "optimizer", "activations")
ACTIVATION_TOLERANCE = 0.10


def model_args(shape: str):
    from megaevo.model.args import ModelArgs

    spec = dict(SHAPES[shape])
    return ModelArgs.from_preset(spec.pop("preset")) if "preset" in spec else ModelArgs(**spec)


def measure_rank(rank: int, world: int, shape_name: str, layout: tuple, micro: int, seq: int,
                 bucket_mb: float) -> dict:
    """This rank's (estimate, measured) bytes per term."""
    import torch

    from megaevo.model.llama import build_chunks
    from megaevo.parallel.data_parallel import GradBuffers
    from megaevo.parallel.state import init_parallel_state
    from megaevo.plan import Candidate, Workload
    from megaevo.plan.model import chunk_activation_bytes, rank_buffers
    from megaevo.training.optimizer import DistributedAdamW

    _, tp, pp, dp, vpp, recompute, dist_opt, sp = layout
    args = model_args(shape_name).replace(recompute=recompute, max_seq_len=max(seq, 16))
    state = init_parallel_state(tp=tp, dp=dp, pp=pp, device_type="cpu", sequence_parallel=sp)
    chunks = build_chunks(args, state, virtual_pp=vpp, seed=0, dtype=torch.float32)
    named = [(c, item) for c, chunk in enumerate(chunks) for item in chunk.named_parameters_with_meta()]
    params = {n: p for _, (n, p, _) in named}
    tied = args.tie_embeddings and pp > 1 and "embedding.weight" in params
    buffers = GradBuffers(params, state, torch.float32, bucket_size=int(bucket_mb * 2**20 / 4), distributed=dist_opt,
                          groups={n: c for c, (n, _, _) in named}, deferred={"embedding.weight"} if tied else set())
    opt = DistributedAdamW(buffers, {n: m for _, (n, _, m) in named}, state, lr=1e-3)
    measured = {"params": buffers.param_buffer.nbytes, "grads": buffers.grad_buffer.nbytes,
                "optimizer": sum(t.nbytes for t in (opt.master, opt.exp_avg, opt.exp_avg_sq))}
    measured["activations"] = sum(saved_bytes(chunk, state, micro, seq, args) for chunk in chunks)

    w = Workload(args, seq, micro * dp, dtype_bytes=4, kernels="torch", bucket_size_mb=bucket_mb)
    c = Candidate(tp, pp, dp, vpp, micro, recompute, dist_opt, sp and tp > 1)
    buf = rank_buffers(args, tp, pp, dp, vpp, None, state.pp_rank, dist_opt, bucket_mb)
    estimate = {"params": buf.numel * 4, "grads": buf.numel * 4, "optimizer": buf.owned * 12,
                "activations": sum(sum(chunk_activation_bytes(args, w, c, k * pp + state.pp_rank))
                                   for k in range(vpp))}
    return {t: (estimate[t], measured[t]) for t in TERMS}


def saved_bytes(chunk, state, micro: int, seq: int, args) -> int:
    """Bytes autograd keeps for backward over one forward of ``chunk`` (each storage once, no parameters)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (micro, seq), generator=gen)
    if chunk.has_embedding:
        x = ids
    else:
        rows = seq // state.tp_size if state.sequence_parallel_active else seq
        x = torch.randn(micro, rows, args.hidden_size, generator=gen, requires_grad=True)
    own = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunk(x, labels=ids) if chunk.has_head else chunk(x)
    del out
    return sum(seen.values())


def _worker(rank, world, init_file, path, fn_args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=120))
        result = ("ok", measure_rank(rank, world, *fn_args))
        if world > 1:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = ("error", traceback.format_exc())
    with open(path, "w") as f:
        json.dump(result, f)


def run_layout(shape: str, layout: tuple, micro: int, seq: int, bucket_mb: float) -> list[dict]:
    world = layout[1] * layout[2] * layout[3]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="megaevo-plan-check-") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), paths[r],
                                                   (shape, layout, micro, seq, bucket_mb))) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
            if p.is_alive():
                p.kill()
        results = []
        for r, path in enumerate(paths):
            if not os.path.exists(path):
                raise RuntimeError(f"{shape} {layout[0]}: rank {r} did not finish")
            with open(path) as f:
                status, value = json.load(f)
            if status != "ok":
                raise RuntimeError(f"{shape} {layout[0]}: rank {r} failed:\n{value}")
            results.append(value)
    rows = []
    for term in TERMS:
        worst = max(range(world), key=lambda r: abs(_ratio(*results[r][term]) - 1))
        est, got = results[worst][term]
        rows.append({"layout": f"{shape}/{layout[0]}", "term": term, "estimate_bytes": int(est),
                     "measured_bytes": int(got), "ratio": round(_ratio(est, got), 4), "rank": worst})
    return rows


def _ratio(estimate: float, measured: float) -> float:
    return estimate / measured if measured else (1.0 if not estimate else float("inf"))


def within_bounds(row: dict) -> bool:
    if row["term"] == "activations":
        return abs(row["ratio"] - 1) <= ACTIVATION_TOLERANCE
    return row["estimate_bytes"] == row["measured_bytes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,100m", help="comma-separated: tiny, 100m (default: %(default)s)")
    ap.add_argument("--layouts", default=None, help="comma-separated layout names (default: all)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--bucket-size-mb", type=float, default=25.0)
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    a = ap.parse_args(argv)
    names = set(a.layouts.split(",")) if a.layouts else None
    rows = []
    for shape in a.shapes.split(","):
        for layout in LAYOUTS:
            if names is None or layout[0] in names:
                rows += run_layout(shape, layout, a.micro_batch, a.seq_len, a.bucket_size_mb)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['layout']:<44} {r['term']:<12} {r['estimate_bytes']:>14,} {r['measured_bytes']:>14,} "
                  f"{r['ratio']:>7.4f}{'' if within_bounds(r) else '  OUT OF BOUNDS'}")
    return 0 if all(within_bounds(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
