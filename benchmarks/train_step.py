"""Steady-state training step time, tokens/s, MFU and peak memory.

    python benchmarks/train_step.py --preset tiny --seq-len 256 --micro-batch 4 [--steps 20] [--json]

Runs megaevo's Trainer on synthetic data (a generated indexed dataset) in one process, and, for
comparison, a minimal plain-PyTorch loop over the same model, data and AdamW (torch.optim.AdamW,
fused on CUDA): the difference is megaevo's per-step overhead. With --hf (needs `transformers`),
also a Hugging Face LlamaForCausalLM of the same shape with SDPA attention and fused AdamW, e.g.
on a GPU: --preset evolm-1b --seq-len 2048 --micro-batch 4 --hf. Prints one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megaevo import stages
from megaevo.config import config_from_dict
from megaevo.data.indexed import IndexedDatasetWriter
from megaevo.model.llama import build_stage
from megaevo.model.flops import flops_per_token
from megaevo.training.metrics import peak_flops
from megaevo.training.trainer import Trainer


def synthetic_corpus(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab < 65500 else np.int32
    with IndexedDatasetWriter(prefix, dtype) as w:
        written = 0
        while written < tokens:
            n = int(rng.integers(200, 2000))
            w.add_document(rng.integers(0, vocab, size=n))
            written += n


def timed_steps(step, warmup: int, steps: int, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def hf_llama_steps(margs, batches, args, device, dtype) -> list[float]:
    """Step times of a Hugging Face LlamaForCausalLM of the same shape (SDPA, fused AdamW on CUDA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=margs.vocab_size, hidden_size=margs.hidden_size,
                         intermediate_size=margs.ffn_hidden_size, num_hidden_layers=margs.num_layers,
                         num_attention_heads=margs.num_heads, num_key_value_heads=margs.num_kv_heads,
                         max_position_embeddings=margs.max_seq_len, rope_theta=margs.rope_theta,
                         rms_norm_eps=margs.norm_eps, tie_word_embeddings=margs.tie_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        for b in batches:
            logits = model(input_ids=b["tokens"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten())
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return timed_steps(step, args.warmup, args.steps, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--hf", action="store_true", help="also time transformers' LlamaForCausalLM of the same shape")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default output is JSON too)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        iters = args.warmup + args.steps
        gbs = args.micro_batch * args.accum
        cfg = config_from_dict({
            "model": {"preset": args.preset, "max_seq_len": max(args.seq_len, 256)},
            "data": {"train": [str(tmp / "synthetic")], "seq_len": args.seq_len, "split": "100,0,0"},
            "train": {"micro_batch_size": args.micro_batch, "global_batch_size": gbs, "iters": iters,
                      "log_interval": 10**9, "eval_interval": 0, "dtype": args.dtype},
            "optim": {"warmup": 0, "lr": 1e-4, "min_lr": 1e-5},
            "checkpoint": {"save": False},
            "out_dir": str(tmp / "run"),
        })
        synthetic_corpus(tmp / "synthetic", cfg.model.vocab_size, (iters + 2) * gbs * (args.seq_len + 1))
        trainer = Trainer(cfg, stages.build_stage)
        device = trainer.device

        # The same model, data and optimizer math in a minimal loop.
        model = build_stage(cfg.model, trainer.state, seed=cfg.train.seed, device=device, dtype=trainer.dtype)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
        batches = trainer.stage.train.batches(0, args.accum)

        def plain_step():
            opt.zero_grad(set_to_none=True)
            for b in batches:
                (model(b["tokens"], b["labels"]).float().sum() / (gbs * args.seq_len)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        # Alternate the two so that both see the same machine load.
        mega, plain = [], []
        for _ in range(args.warmup + args.steps):
            mega += timed_steps(trainer.train_step, 0, 1, device)
            plain += timed_steps(plain_step, 0, 1, device)
        mega, plain = mega[args.warmup:], plain[args.warmup:]
        runs = [("megaevo", mega), ("plain-pytorch", plain)]
        if args.hf:
            runs.append(("hf-transformers", hf_llama_steps(cfg.model, batches, args, device, trainer.dtype)))

    tokens = gbs * args.seq_len
    peak = peak_flops(device)
    fpt = flops_per_token(cfg.model, args.seq_len)
    for impl, times in runs:
        step = statistics.median(times)
        tps = tokens / step
        print(json.dumps({
            "impl": impl, "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "accum": args.accum, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": str(trainer.dtype), "step_s": round(step, 5), "tokens_per_s": round(tps, 1),
            "mfu": round(tps * fpt / peak, 4) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        }), flush=True)
    print(json.dumps({"overhead_vs_plain": round(statistics.median(mega) / statistics.median(plain) - 1, 4)}))


if __name__ == "__main__":
    main()
