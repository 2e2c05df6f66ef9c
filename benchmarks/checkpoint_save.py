"""Time a checkpoint save through the trainer's saving path, with and without checksums.

    python benchmarks/checkpoint_save.py [--preset evolm-1b] [--checksums none sha256 crc32] [--repeats 1]
                                         [--load] [--dir DIR]

Builds the preset's parameters at TP=1 as random CPU tensors (weights bf16; fp32 master weights
and both Adam moments: about 14 bytes a parameter), then saves them with the trainer's
`Checkpointer` (a synchronous save of a `SavePlan` from `build_save_plan`) once per checksum
choice, into a checkpoints folder under --dir (default: the system's temporary directory). Each
checkpoint is deleted after it is timed (and after --load has read it back), so every save writes
into a page cache of the same state; the choices take turns over the repeats and the fastest of
each counts. The files land in the page cache and on disk as the kernel flushes them: this times
the save as a training process sees it, not the disk.

With --load, each checkpoint is also read back whole (every tensor of every kind, as a resume at
another layout would) with and without verification (checksums on first opening and finite
values), from the page cache where it still is.

Prints one JSON object: the model's size, seconds per choice, and for each checksum its cost in
seconds and in percent of the save without one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from megaevo.checkpoint import (CHECKSUMS, STATE_KINDS, Checkpointer, CheckpointMeta, LoadedCheckpoint, SavedLayout,
                                build_save_plan, iteration_dir)
from megaevo.model.args import ModelArgs
from megaevo.model.llama import build_chunks
from megaevo.parallel.state import ParallelState


def random_state(preset: str, seed: int = 0):
    """Parameters (bf16), their layouts, and fp32 optimizer state of `preset` at TP=1, filled at random."""
    args = ModelArgs.from_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    params, metas, state = {}, {}, {}
    for chunk in build_chunks(args, ParallelState(), device="meta"):
        for name, p, meta in chunk.named_parameters_with_meta():
            params[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
            metas[name] = meta
            state[name] = {kind: torch.randn(p.shape, generator=gen).abs_() * 1e-4 for kind in STATE_KINDS}
    return params, metas, state


def save(root: Path, checksum: str | None, params, metas, state, iteration: int = 1000) -> float:
    """Seconds for one synchronous save of iteration `iteration` under `root`."""
    meta = CheckpointMeta(iteration=iteration, consumed_samples=iteration * 512,
                          layout=SavedLayout(tp=1, pp=1, dp=1, dtype=str(torch.bfloat16)))
    plan = build_save_plan(meta, params, metas, state, ParallelState(), rank=0, world_size=1)
    start = time.perf_counter()
    Checkpointer(root, checksum=checksum).save(plan)
    return time.perf_counter() - start


def read_back(path: Path, verify: bool) -> float:
    """Seconds to read every tensor of every kind of checkpoint `path`."""
    start = time.perf_counter()
    ck = LoadedCheckpoint(path, verify=verify)
    for kind, named in ck.record.tensors.items():
        for name in named:
            ck.tensor(kind, name)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="evolm-1b", help="model preset (tiny for a quick run)")
    p.add_argument("--checksums", nargs="+", default=["none", "sha256", "crc32"], choices=["none", *CHECKSUMS])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--load", action="store_true", help="also time reading each checkpoint back, verified or not")
    p.add_argument("--dir", help="where to write (default: the system's temporary directory)")
    args = p.parse_args()

    start = time.perf_counter()
    params, metas, state = random_state(args.preset)
    n_params = sum(t.numel() for t in params.values())
    tensor_bytes = sum(t.numel() * t.element_size() for t in params.values()) + sum(
        t.numel() * t.element_size() for kinds in state.values() for t in kinds.values())
    print(f"generated {n_params:,} parameters ({tensor_bytes / 1e9:.2f} GB with optimizer state) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="megaevo-ckpt-bench-", dir=args.dir))
    save_s: dict[str, list[float]] = {c: [] for c in args.checksums}
    load_s: dict[str, list[float]] = {}
    file_bytes = 0
    try:
        for _ in range(args.repeats):
            for choice in args.checksums:
                root = work / "checkpoints"
                save_s[choice].append(save(root, None if choice == "none" else choice, params, metas, state))
                path = iteration_dir(root, 1000)
                file_bytes = sum(f.stat().st_size for f in path.iterdir())
                if args.load:
                    for verify in (False, True):
                        key = f"{choice}_{'verified' if verify else 'unverified'}"
                        load_s.setdefault(key, []).append(read_back(path, verify))
                shutil.rmtree(root)
                os.sync()
                print(f"{choice}: save {save_s[choice][-1]:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {c: min(t) for c, t in save_s.items()}
    out = {"preset": args.preset, "parameters": n_params, "checkpoint_bytes": file_bytes,
           "repeats": args.repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "save_s": {c: round(t, 3) for c, t in best.items()},
           "save_gb_per_s": {c: round(file_bytes / t / 1e9, 3) for c, t in best.items()}}
    if "none" in best:
        out["checksum_cost_s"] = {c: round(t - best["none"], 3) for c, t in best.items() if c != "none"}
        out["checksum_cost_pct"] = {c: round(100 * (t - best["none"]) / best["none"], 1)
                                    for c, t in best.items() if c != "none"}
    if load_s:
        out["load_s"] = {k: round(min(t), 3) for k, t in load_s.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
