"""SFT batching: packing efficiency against padding, and the SFT step's tokens/s against pre-training's.

    python benchmarks/sft.py [--preset tiny|100m|evolm-1b] [--seq-len 512] [--micro-batch 4] [--steps 10] [--json]

1. Packing efficiency: the share of non-padding tokens when an epoch of conversations with a
   realistic length distribution (log-normal, median --median-len tokens, capped at the sequence
   length) is packed several per sequence (`sft.packing: true`, megaevo.stages.sft.pack) and when
   each conversation gets its own padded row (`sft.packing: false`). Target: packing >= 95%.
2. Step throughput: megaevo's Trainer on the same model, sequence length and batch, once as
   pre-training on a synthetic corpus and once as SFT on packed synthetic conversations (loss masks,
   document ids, positions restarting per conversation). Both count every token of the step's
   sequences; the two alternate step by step so that both see the same machine load. Target: the
   SFT step at >= 0.95x the pre-training step's tokens/s.

Prints one JSON object per line (rows carry `kind`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import SHAPES  # noqa: E402
from train_step import synthetic_corpus, timed_steps  # noqa: E402

from megaevo.config import config_from_dict  # noqa: E402
from megaevo.data.indexed import IndexedDatasetWriter  # noqa: E402
from megaevo.stages.sft import pack  # noqa: E402
from megaevo.stages import build_stage  # noqa: E402
from megaevo.training.trainer import Trainer  # noqa: E402


def conversation_lengths(n: int, median: int, cap: int, seed: int = 0) -> np.ndarray:
    """Log-normal conversation lengths (sigma 0.8, as instruction data tends to be), in [8, cap]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), 0.8, size=n).astype(np.int64), 8, cap)


def synthetic_conversations(prefix: Path, lengths: np.ndarray, vocab: int, seed: int = 0) -> None:
    """An SFT dataset as `megaevo preprocess --sft` writes it: one document per conversation, and the
    loss mask (the last ~60% of each conversation, the response) in PREFIX.loss_mask.bin."""
    rng = np.random.default_rng(seed)
    masks = []
    with IndexedDatasetWriter(prefix, np.uint16 if vocab < 65500 else np.int32) as w:
        for n in lengths:
            w.add_document(rng.integers(0, vocab, size=int(n)))
            mask = np.zeros(int(n), dtype=np.uint8)
            mask[int(n * 0.4):] = 1
            masks.append(mask)
    np.concatenate(masks).tofile(f"{prefix}.loss_mask.bin")


def efficiency_rows(args) -> list[dict]:
    lengths = conversation_lengths(args.conversations, args.median_len, args.seq_len)
    items, bounds = pack(lengths, args.seq_len)
    packed = int(lengths.sum()) / ((len(bounds) - 1) * args.seq_len)
    padded = float(lengths.mean()) / args.seq_len
    common = {"kind": "packing_efficiency", "conversations": len(lengths), "seq_len": args.seq_len,
              "median_len": int(np.median(lengths)), "mean_len": round(float(lengths.mean()), 1)}
    return [{**common, "mode": "packing", "sequences": len(bounds) - 1, "efficiency": round(packed, 4),
             "target": 0.95, "meets_target": packed >= 0.95},
            {**common, "mode": "padding", "sequences": len(lengths), "efficiency": round(padded, 4)}]


def throughput_rows(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        iters = args.warmup + args.steps
        gbs = args.micro_batch * args.accum

        def config(stage: str, data: str) -> dict:
            return config_from_dict({
                "stage": stage,
                "model": {**({"preset": args.preset} if args.preset not in SHAPES or args.preset == "tiny"
                             else SHAPES[args.preset]), "max_seq_len": max(args.seq_len, 256)},
                "data": {"train": [data], "seq_len": args.seq_len, "split": "100,0,0"},
                "train": {"micro_batch_size": args.micro_batch, "global_batch_size": gbs, "iters": iters,
                          "log_interval": 10**9, "eval_interval": 0, "dtype": args.dtype},
                "optim": {"warmup": 0, "lr": 1e-4, "min_lr": 1e-5},
                "checkpoint": {"save": False},
                "out_dir": str(tmp / f"run-{stage}"),
            })

        pre_cfg = config("pretrain", str(tmp / "corpus"))
        vocab = pre_cfg.model.vocab_size
        synthetic_corpus(tmp / "corpus", vocab, (iters + 2) * gbs * (args.seq_len + 1))
        lengths = conversation_lengths(max(4 * (iters + 2) * gbs * args.seq_len // args.median_len, 64),
                                       args.median_len, args.seq_len, seed=1)
        synthetic_conversations(tmp / "sft", lengths, vocab)
        pretrain, sft = Trainer(pre_cfg, build_stage), Trainer(config("sft", str(tmp / "sft")), build_stage)
        times = {"pretrain": [], "sft": []}
        for _ in range(iters):  # alternate, so that both see the same machine load
            times["pretrain"] += timed_steps(pretrain.train_step, 0, 1, pretrain.device)
            times["sft"] += timed_steps(sft.train_step, 0, 1, sft.device)
        rows = []
        for stage, ts in times.items():
            step = statistics.median(ts[args.warmup:])
            rows.append({"kind": "step", "stage": stage, "preset": args.preset, "seq_len": args.seq_len,
                         "micro_batch": args.micro_batch, "accum": args.accum, "device": str(pretrain.device),
                         "dtype": str(pretrain.dtype).replace("torch.", ""), "step_s": round(step, 4),
                         "tokens_per_s": round(gbs * args.seq_len / step, 1)})
        ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        rows[1].update({"vs_pretrain": round(ratio, 3), "target": 0.95, "meets_target": ratio >= 0.95})
        return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="a model preset, or 100m (12 layers, hidden 768)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--conversations", type=int, default=100_000, help="conversations in the packing measurement")
    p.add_argument("--median-len", type=int, default=None, help="median conversation length (default seq_len / 4)")
    p.add_argument("--skip-steps", action="store_true", help="only the packing efficiency")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default output is JSON too)")
    args = p.parse_args()
    args.median_len = args.median_len or max(args.seq_len // 4, 8)
    rows = efficiency_rows(args) + ([] if args.skip_steps else throughput_rows(args))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
