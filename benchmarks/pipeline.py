"""Pipeline step time and bubble: PP = 1, 2, 4, 1F1B and interleaved, on the CPU with gloo.

    python benchmarks/pipeline.py [--pp 1 2 4] [--virtual-pp 1 2] [--micro-batches 8] [--steps 3] [--json]

For each layout, spawns PP processes (one thread each) that run one model through
megaevo.parallel.pipeline.PipelineEngine: forward and backward of every micro-batch of a step,
with the real point-to-point exchange. The measured bubble of a rank is the share of its step spent
waiting for a neighbour's message; the theory for equal stages is (p - 1) / (v m + p - 1) of the
step (v = 1 for 1F1B). Every process wants a core of its own: with more processes than cores the
stages take turns on the cores and the measured bubble no longer means idle hardware. Prints one
JSON object per layout (a list with --json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, result_dir, opts):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from megaevo.model import ModelArgs
    from megaevo.model.llama import build_chunks
    from megaevo.parallel.pipeline import PipelineEngine
    from megaevo.parallel.state import init_parallel_state
    from megaevo.training.stage import TokenLoss

    state = init_parallel_state(tp=1, dp=1, pp=world, device_type="cpu")
    args = ModelArgs(num_layers=opts["layers"], hidden_size=opts["hidden"], ffn_hidden_size=opts["hidden"] * 8 // 3 // 8 * 8,
                     num_heads=opts["hidden"] // 64, num_kv_heads=opts["hidden"] // 64, vocab_size=opts["vocab"],
                     max_seq_len=opts["seq"])
    chunks = build_chunks(args, state, virtual_pp=opts["vpp"], seed=0)
    engine = PipelineEngine(chunks, state, (opts["micro_batch"], opts["seq"], args.hidden_size), torch.float32,
                            torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, args.vocab_size, (opts["micro_batch"], opts["seq"]), generator=gen),
                "labels": torch.randint(0, args.vocab_size, (opts["micro_batch"], opts["seq"]), generator=gen)}
               for _ in range(opts["micro"])]
    records = []
    for step in range(opts["steps"] + 1):  # the first step warms up
        for c in chunks:
            c.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        loss = TokenLoss()
        stats = engine.run(batches, loss_fn=loss, loss_scale=1.0 / max(sum(float(loss.count(b)) for b in batches), 1.0))
        dist.barrier()
        if step:
            records.append({"step_s": time.perf_counter() - t0, "wait_s": stats.wait_s, "run_s": stats.total_s})
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()


def measure(pp: int, vpp: int, opts: dict) -> dict:
    opts = {**opts, "vpp": vpp}
    with tempfile.TemporaryDirectory(prefix="megaevo-pipe-") as tmp:
        mp.start_processes(_worker, args=(pp, os.path.join(tmp, "store"), tmp, opts), nprocs=pp, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(pp)]
    step = statistics.median(max(r[i]["step_s"] for r in ranks) for i in range(opts["steps"]))
    bubble = [statistics.median(s["wait_s"] / s["run_s"] for s in r) for r in ranks]
    m = opts["micro"]
    return {"pp": pp, "virtual_pp": vpp, "micro_batches": m, "layers": opts["layers"], "hidden": opts["hidden"],
            "seq_len": opts["seq"], "micro_batch_size": opts["micro_batch"], "step_s": round(step, 4),
            "bubble_measured": round(statistics.mean(bubble), 4) if pp > 1 else 0.0,
            "bubble_per_rank": [round(b, 4) for b in bubble] if pp > 1 else [0.0],
            "bubble_theory": round((pp - 1) / (vpp * m + pp - 1), 4), "cpu_count": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--virtual-pp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON list at the end")
    a = p.parse_args()
    opts = {"micro": a.micro_batches, "micro_batch": a.micro_batch_size, "layers": a.layers, "hidden": a.hidden,
            "seq": a.seq_len, "vocab": a.vocab, "steps": a.steps}
    results = []
    for pp in a.pp:
        for vpp in a.virtual_pp:
            if vpp > 1 and (pp < 2 or a.micro_batches % pp or a.layers % (pp * vpp)):
                continue
            r = measure(pp, vpp, opts)
            results.append(r)
            if not a.json:
                print(json.dumps(r), flush=True)
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
