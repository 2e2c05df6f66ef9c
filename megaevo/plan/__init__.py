"""The layout planner: per-GPU memory and step time of every TP x PP x DP layout, before launch.

    megaevo plan --model evolm-4b --seq-len 2048 --global-batch 512 --gpus 64 --gpu h100-80g

:func:`plan` enumerates the legal layouts (:func:`candidates`), estimates each (:mod:`megaevo.plan.model`)
and ranks them: layouts that fit first, then by step time. ``benchmarks/plan_check.py`` compares the
memory terms with what a real step holds.

Notation: ``b`` micro-batch size, ``s`` sequence length, ``h`` hidden size, ``a`` / ``k`` query / KV
heads, ``d`` head dim, ``f`` FFN size, ``L`` layers, ``V`` the vocabulary padded to a multiple of
``vocab_pad_multiple * t``, ``t`` / ``p`` / ``v`` / ``r`` TP / PP / virtual PP / DP sizes, ``m`` micro-batches
per step (global batch / (r b)), ``e`` bytes of the compute dtype (2 for bf16 on a GPU, 4 for fp32 on
the CPU), ``t_sp`` = t with sequence parallelism, else 1.

Memory per GPU (bytes; the pipeline rank with the largest total)
--------------------------------------------------------------------
* weights ``N e`` and gradients ``4 N``: ``N`` is the length of the flat buffers of
  megaevo.parallel.data_parallel: this rank's parameters (its chunks' layers, the embedding
  ``V h / t`` on virtual stage 0, the final norm and output ``V h / t`` on the last one, no output
  weight where tied embeddings share one stage), cut into buckets of ``bucket_size_mb`` (a new bucket
  per model chunk and for the deferred tied copies) and each bucket padded to a multiple of ``r``.
  Gradients accumulate in float32 main grads whatever the compute dtype.
* optimizer ``12 N_own``: float32 master weights and both Adam moments. Without the distributed
  optimizer ``N_own = N``; with it (ZeRO-1) each DP rank owns ``size / r`` of every bucket.
* activations: ``in_flight x A_chunk``, with ``in_flight`` the schedule's bound
  (megaevo.common.activation_bound): ``min(p - rank, m)`` for 1F1B, ``min(2 (p - rank - 1)
  + (v - 1) p + 1, m v)`` chunk-micro-batches for the interleaved schedule (every one when m = p). Per
  decoder layer and micro-batch (after Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", Table 2, for megaevo's kernels)::

      2 (b s h e + 4 b s) / t_sp           x and float32 rstd of both RMSNorms
    + 2 b s h e                            the inputs of qkv and gate_up (all-gathered under SP:
                                           megaevo keeps the gathered copy, where Megatron-LM keeps
                                           the 1/t shard and gathers it again in backward)
    + b s (a + 2k) d e / t                 the fused QKV output (V is a view of it)
    + b s (a + k) d e / t                  rotated Q and K
    + b s a d e / t                        the attention output (the dense layer's input)
    + 4 b a s / t                          the flash-attention log-sum-exp (not with selective recompute)
    + 3 b s f e / t                        gate_up output and the SwiGLU output (down's input)

  A flash kernel never stores the ``5 a s^2 b`` softmax and dropout terms of Korthikanti's formula, so
  selective recompute (recompute the attention core) saves only its log-sum-exp here. Full recompute
  keeps ``b s h e / t_sp`` per layer (the checkpointed input) plus one layer's full activations while
  it is rebuilt (counted under temporary). The plain-torch kernels of a CPU run also keep each norm's
  normalised ``x`` (``2 b s h e / t_sp``) and ``silu(gate)`` (``b s f e / t``). Each chunk adds its float32
  rotary tables ``2 s_max d / 2 x 4``; virtual stage 0 the token ids (int64); the last one the final
  norm (``b s h e / t_sp + 4 b s / t_sp``) and the output layer's input ``b s h e``.
* logits: the cross-entropy keeps ``b s V / t`` logits (``e`` bytes; the plain-torch reference keeps a
  float32 softmax instead) and per-token ids and statistics, for the one micro-batch in the head.
* temporary: the gradient of the logits, the largest parameter's ``.grad`` before it is added to its
  main grad, the updated shards cloned for the distributed optimizer's all-gather (``N e / r``), and
  with full recompute one layer's rebuilt activations.

Step time (seconds)
-------------------
* compute: ``6 P + 6 L s h`` FLOPs per token (megaevo.model.flops.flops_per_token; selective
  recompute adds the attention forward, full recompute a whole forward of the layers) at
  ``efficiency x peak`` on every GPU. ``efficiency = base x T / (T + 1024)`` for ``T = b s`` tokens per
  micro-batch: small micro-batches run below the kernels' best; ``base`` (``--efficiency``) is 0.6 by
  default, about what megaevo's Triton kernels reach on H100 for 1B-8B shapes.
* bubble: ``compute x (p - 1) / (v m)`` (Narayanan et al. 2021, "Efficient Large-Scale Language
  Model Training on GPU Clusters Using Megatron-LM", section 2.2: the interleaved schedule divides
  1F1B's bubble by v).
* tp_comm: per layer and micro-batch two all-reduces in forward and two in backward (two all-gathers
  and two reduce-scatters of the same volume with SP; two more for a recomputed forward), each
  ``2 (t - 1) / t x b s h e`` bytes over the intra-node link; megaevo does not overlap them.
* pp_comm: every virtual stage boundary sends ``b s h e / t_sp`` forward and back per micro-batch,
  over the intra-node link when the ``t r`` GPUs between pipeline neighbours sit in one node
  (device mesh order pp, dp, tp), else inter-node.
* dp_comm: the float32 gradients (``4 N``) are all-reduced (``2 (r - 1) / r``) or reduce-scattered
  (``(r - 1) / r``) bucket by bucket while the last micro-batch runs backward; what that backward
  cannot hide (at least the last bucket) is exposed. The distributed optimizer then all-gathers
  ``N e`` bytes of parameters, not overlapped. The DP group crosses nodes when ``t r`` exceeds the GPUs
  per node.
* optimizer: the fused AdamW reads and writes master weights, both moments, the gradient and the
  parameter, ``N_own (24 + 4 + e)`` bytes at the device's memory bandwidth.

tokens/s = global batch x s / step time; MFU = flops_per_token x tokens/s / (GPUs x peak), the
same definition as the training logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megaevo.errors import UserError
from megaevo.model.args import RECOMPUTE_MODES, ModelArgs, layout_errors

from .model import GB, MEMORY_TERMS, Candidate, Estimate, Hardware, Workload, estimate, memory, rank_buffers

__all__ = ["GB", "GPUS", "INTERCONNECTS", "MEMORY_TERMS", "Candidate", "Estimate", "Hardware", "Workload",
           "candidates", "check_fits", "estimate", "hardware", "memory", "of_config", "plan", "rank_buffers", "row"]

# GPU presets: memory (bytes, as torch reports it), dense bf16 peak (FLOP/s), HBM bandwidth (bytes/s).
GPUS = {
    "h100-80g": dict(memory=79.6 * GB, peak_flops=989e12, hbm=3.35e12),
    "h200": dict(memory=139.8 * GB, peak_flops=989e12, hbm=4.8e12),
    "a100-80g": dict(memory=79.2 * GB, peak_flops=312e12, hbm=2.0e12),
}
# Link presets: bandwidth per GPU and direction (bytes/s).
INTERCONNECTS = {
    "nvlink4": 450e9,   # H100 / H200 NVLink 4 (18 links x 25 GB/s)
    "nvlink3": 300e9,   # A100 NVLink 3 (12 links x 25 GB/s)
    "pcie5": 64e9,      # PCIe 5.0 x16
    "ib-ndr": 50e9,     # InfiniBand NDR, one 400 Gb/s port per GPU
    "ib-hdr": 25e9,     # InfiniBand HDR, one 200 Gb/s port per GPU
    "roce-200": 25e9,   # 200 Gb/s Ethernet per GPU
}
MAX_MICRO_BATCH = 16


def hardware(gpu: str, *, memory_gb: float | None = None, peak_tflops: float | None = None,
             intra: str | float = "nvlink4", inter: str | float = "ib-ndr", gpus_per_node: int = 8) -> Hardware:
    """A GPU preset with any of its numbers replaced; links by preset name or GB/s."""
    if gpu not in GPUS and gpu != "custom":
        raise UserError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or --gpu custom with "
                        f"--gpu-memory and --peak-tflops)")
    base = dict(GPUS.get(gpu, dict(memory=0.0, peak_flops=0.0, hbm=3.35e12)))
    if memory_gb is not None:
        base["memory"] = memory_gb * GB
    if peak_tflops is not None:
        base["peak_flops"] = peak_tflops * 1e12
    if base["memory"] <= 0 or base["peak_flops"] <= 0:
        raise UserError("--gpu custom needs --gpu-memory GB and --peak-tflops TFLOPS (both positive)")
    return Hardware(gpu, base["memory"], base["peak_flops"], base["hbm"], _link(intra, "--intra-node"),
                    _link(inter, "--inter-node"), gpus_per_node)


def _link(value: str | float, flag: str) -> float:
    if isinstance(value, (int, float)):
        return float(value) * 1e9
    if value in INTERCONNECTS:
        return INTERCONNECTS[value]
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{flag}: unknown interconnect {value!r}; known: {', '.join(INTERCONNECTS)} "
                        f"(or a bandwidth in GB/s)") from None
    if number <= 0:
        raise UserError(f"{flag}: a bandwidth must be positive (got {value})")
    return number * 1e9


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(shape: ModelArgs, gpus: int, global_batch: int, gpus_per_node: int, *, tp: int | None = None,
               pp: int | None = None, pp_layers: list[int] | None = None) -> list[Candidate]:
    """Every legal layout of ``gpus`` GPUs (``tp`` / ``pp`` fixed when given; ``pp_layers`` fixes
    pp x virtual_pp)."""
    out = []
    heads = math.gcd(shape.num_heads, shape.num_kv_heads, shape.ffn_hidden_size)
    for t in ([tp] if tp else _divisors(min(heads, gpus_per_node))):
        for p in ([pp] if pp else _divisors(shape.num_layers)):
            if gpus % (t * p) or (pp_layers and len(pp_layers) % p):
                continue
            dp = gpus // (t * p)
            if global_batch % dp:
                continue
            vpps = [len(pp_layers) // p] if pp_layers else \
                [v for v in _divisors(shape.num_layers // p) if v == 1 or p > 1] if shape.num_layers % p == 0 else []
            for v in vpps:
                if layout_errors(shape, t, p, v, pp_layers):
                    continue
                per_dp = global_batch // dp
                for mbs in (x for x in _divisors(per_dp) if x <= MAX_MICRO_BATCH):
                    if v > 1 and (per_dp // mbs) % p:
                        continue
                    for recompute in RECOMPUTE_MODES:
                        for dist in ((False, True) if dp > 1 else (False,)):
                            for sp in ((False, True) if t > 1 else (False,)):
                                out.append(Candidate(t, p, dp, v, mbs, recompute, dist, sp,
                                                     tuple(pp_layers) if pp_layers else None))
    return out


def layout_problem(shape: ModelArgs, gpus: int, global_batch: int, gpus_per_node: int, tp: int | None,
                   pp: int | None) -> str:
    """Why no layout was found, in one sentence."""
    if tp and tp > gpus_per_node:
        return (f"--tp {tp} is above --gpus-per-node {gpus_per_node}: a tensor-parallel group must stay "
                f"within a node")
    if tp and (errors := layout_errors(shape, tp, 1, names={"tp": "--tp"})):
        return errors[0]
    if pp and (errors := layout_errors(shape, 1, pp, names={"pp": "--pp"})):
        return errors[0]
    return (f"no layout splits {gpus} GPUs into TP x PP x DP with TP dividing the model's heads, KV heads and "
            f"FFN (at most {gpus_per_node} per node), PP dividing its {shape.num_layers} layers and DP dividing "
            f"the global batch of {global_batch}: choose a GPU count that is such a product")


def plan(w: Workload, hw: Hardware, gpus: int, *, efficiency: float = 0.6, tp: int | None = None,
         pp: int | None = None, pp_layers: list[int] | None = None) -> list[Estimate]:
    """Every legal layout's estimate, best first: layouts that fit, fastest first, then the others by
    memory. UserError when there is none."""
    if gpus < 1 or w.global_batch < 1 or w.seq_len < 1:
        raise UserError(f"--gpus, --global-batch and --seq-len must be positive (got {gpus}, {w.global_batch}, "
                        f"{w.seq_len})")
    if tp and tp > hw.gpus_per_node:
        raise UserError(layout_problem(w.model, gpus, w.global_batch, hw.gpus_per_node, tp, pp))
    found = candidates(w.model, gpus, w.global_batch, hw.gpus_per_node, tp=tp, pp=pp, pp_layers=pp_layers)
    if not found:
        raise UserError(layout_problem(w.model, gpus, w.global_batch, hw.gpus_per_node, tp, pp))
    rows = [estimate(w, c, hw, efficiency) for c in found]
    return sorted(rows, key=lambda r: (not r.fits, r.step_s if r.fits else r.memory_bytes, r.memory_bytes))


def row(est: Estimate) -> dict:
    """The JSON row of an estimate (``megaevo plan --json``)."""
    c = est.candidate
    return {"tp": c.tp, "pp": c.pp, "dp": c.dp, "virtual_pp": c.virtual_pp, "micro_batch_size": c.micro_batch_size,
            "recompute": c.recompute, "distributed_optimizer": c.distributed_optimizer,
            "sequence_parallel": c.sequence_parallel, "memory_gb": round(est.memory_bytes / GB, 3),
            "memory": {k: round(v / GB, 3) for k, v in est.memory.items()}, "fits": est.fits,
            "step_s": round(est.step_s, 4), "tokens_per_s": round(est.tokens_per_s, 1), "mfu": round(est.mfu, 4),
            "efficiency": round(est.efficiency, 4), "time": {k: round(v, 4) for k, v in est.time.items()},
            "overrides": " ".join(c.overrides())}


def of_config(cfg, dp: int, *, dtype_bytes: int = 2, kernels: str = "triton") -> tuple[Workload, Candidate]:
    """The workload and the layout a run's :class:`megaevo.config.Config` describes, at data-parallel
    size ``dp`` (what its world size leaves beside TP and PP)."""
    p = cfg.parallel
    w = Workload(cfg.model, cfg.seq_len, cfg.train.global_batch_size, dtype_bytes=dtype_bytes, kernels=kernels,
                 bucket_size_mb=p.bucket_size_mb)
    c = Candidate(p.tp, p.pp, dp, p.virtual_pp, cfg.train.micro_batch_size, cfg.model.recompute,
                  p.distributed_optimizer, p.sequence_parallel and p.tp > 1,
                  tuple(p.pp_layers) if p.pp_layers else None)
    return w, c


@dataclass(frozen=True)
class FitCheck:
    """A run's own layout measured against its device: the estimate, and the best layout that fits."""

    estimate: Estimate
    device_memory: float
    best: Estimate | None

    def message(self) -> str:
        e = self.estimate
        term = e.biggest_term
        best = (f"the best layout that fits is {' '.join(self.best.candidate.overrides())} "
                f"(~{self.best.memory_bytes / GB:.1f} GB)") if self.best else "no layout of this world size fits"
        return (f"this layout needs ~{e.memory_bytes / GB:.2f} GB per GPU, more than the device's "
                f"{self.device_memory / GB:.2f} GB; the biggest term is {term} ({e.memory[term] / GB:.2f} GB); "
                f"{best}")


def check_fits(w: Workload, c: Candidate, device_memory: float, gpus_per_node: int,
               peak_flops: float = 989e12) -> FitCheck:
    """Whether layout ``c`` fits ``device_memory`` bytes per GPU, and the best layout of the same
    world size that does."""
    hw = Hardware("device", device_memory, peak_flops, 3.35e12, gpus_per_node=gpus_per_node)
    own = estimate(w, c, hw)
    best = None
    if not own.fits:
        try:
            ranked = plan(w, hw, c.gpus, pp_layers=list(c.pp_layers) if c.pp_layers else None)
        except UserError:
            ranked = []
        best = next((r for r in ranked if r.fits), None)
    return FitCheck(own, device_memory, best)
