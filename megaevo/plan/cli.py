"""`megaevo plan`: the ranked table of layouts (see megaevo.plan)."""
from __future__ import annotations

import argparse
import json

from megaevo.config import load_config
from megaevo.errors import UserError
from megaevo.model.args import ModelArgs

from . import GB, GPUS, INTERCONNECTS, MEMORY_TERMS, Workload, hardware, plan, row

SHORT = {"weights": "weight", "gradients": "grads", "optimizer": "optim", "activations": "activ", "temporary": "temp"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PRESET", help="a model preset (evolm-0.5b, evolm-1b, evolm-2b, evolm-4b, tiny)")
    src.add_argument("--config", metavar="FILE", help="a run's YAML config: its model, sequence length, global batch "
                     "and pp_layers")
    p.add_argument("--seq-len", type=int, default=None, help="sample length (default: the config's or the model's)")
    p.add_argument("--global-batch", type=int, default=None, help="samples per step (default: the config's, else 512)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: %(default)s)")
    p.add_argument("--gpu", default="h100-80g", help=f"{', '.join(GPUS)} or custom (default: %(default)s)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="device memory in GiB (overrides --gpu)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                   help="dense bf16 peak (overrides --gpu)")
    p.add_argument("--intra-node", default="nvlink4", metavar="LINK",
                   help=f"{', '.join(INTERCONNECTS)} or GB/s per GPU (default: %(default)s)")
    p.add_argument("--inter-node", default="ib-ndr", metavar="LINK", help="as --intra-node (default: %(default)s)")
    p.add_argument("--efficiency", type=float, default=0.6,
                   help="share of peak the compute reaches on large micro-batches (default: %(default)s)")
    p.add_argument("--tp", type=int, default=None, help="only layouts of this tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="only layouts of this pipeline-parallel size")
    p.add_argument("--top", type=int, default=20, metavar="N", help="rows to print (default: %(default)s; 0: all)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def _workload(args) -> tuple[Workload, list[int] | None]:
    if args.config:
        cfg = load_config(args.config)
        seq = args.seq_len or cfg.seq_len
        batch = args.global_batch or cfg.train.global_batch_size
        return Workload(cfg.model, seq, batch, bucket_size_mb=cfg.parallel.bucket_size_mb), cfg.parallel.pp_layers
    shape = ModelArgs.from_preset(args.model)
    return Workload(shape, args.seq_len or shape.max_seq_len, args.global_batch or 512), None


def run(args) -> int:
    if args.efficiency <= 0 or args.efficiency > 1:
        raise UserError(f"--efficiency must be in (0, 1] (got {args.efficiency})")
    if args.gpus_per_node < 1 or args.top < 0:
        raise UserError("--gpus-per-node must be positive and --top at least 0")
    w, pp_layers = _workload(args)
    hw = hardware(args.gpu, memory_gb=args.gpu_memory, peak_tflops=args.peak_tflops, intra=args.intra_node,
                  inter=args.inter_node, gpus_per_node=args.gpus_per_node)
    ranked = plan(w, hw, args.gpus, efficiency=args.efficiency, tp=args.tp, pp=args.pp, pp_layers=pp_layers)
    shown = ranked[: args.top] if args.top else ranked
    if args.json:
        print(json.dumps([row(e) for e in shown], indent=1))
        return 0
    fitting = sum(e.fits for e in ranked)
    print(f"{len(ranked)} layouts of {args.gpus} GPUs ({fitting} fit {hw.memory / GB:.1f} GB); seq {w.seq_len}, "
          f"global batch {w.global_batch}; compute at up to {args.efficiency:.0%} of "
          f"{hw.peak_flops / 1e12:.0f} TFLOP/s")
    print("memory per GPU in GB: weights, gradients, optimizer (master + Adam), activations, logits, temporary "
          "buffers; GB: their sum")
    head = (f"{'#':>3} {'tp':>2} {'pp':>2} {'vpp':>3} {'dp':>3} {'mbs':>3} {'recomp':<9} {'sp':<3} {'zero1':<5} "
            + " ".join(f"{SHORT.get(t, t):>6}" for t in MEMORY_TERMS) + f" {'GB':>6} {'fits':<4} {'step_s':>7} {'tok/s':>10} "
            f"{'mfu':>5}  overrides")
    print(head)
    for i, e in enumerate(shown, 1):
        c = e.candidate
        terms = " ".join(f"{e.memory[t] / GB:>6.1f}" for t in MEMORY_TERMS)
        print(f"{i:>3} {c.tp:>2} {c.pp:>2} {c.virtual_pp:>3} {c.dp:>3} {c.micro_batch_size:>3} {c.recompute:<9} "
              f"{'on' if c.sequence_parallel else '-':<3} {'on' if c.distributed_optimizer else '-':<5} {terms} "
              f"{e.memory_bytes / GB:>6.1f} {'yes' if e.fits else 'no':<4} {e.step_s:>7.3f} {e.tokens_per_s:>10,.0f} "
              f"{e.mfu:>5.1%}  {' '.join(c.overrides())}")
    return 0
