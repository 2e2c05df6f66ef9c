"""The training loop: one code path for one CPU process, one GPU, or torchrun on many.

    megaevo train --config FILE [key=value ...]
    torchrun --nproc_per_node N -m megaevo.train --config FILE [key=value ...]

A step takes `global_batch_size` samples: each DP rank runs its micro-batches through the
pipeline schedule (1F1B, or interleaved with `parallel.virtual_pp` chunks per stage; with PP = 1
simply forward and backward in turn). Gradients accumulate in the fp32 buffers, and each model
chunk's DP reduction starts during its last backward; tied embeddings first sum their gradients
across the first and last stage. Then the optimizer clips on the global norm and updates. The data
position is a function of consumed samples, so stopping and resuming (also on another layout with
the same global batch) continues the same run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megaevo import kernels
from megaevo.config import Config, ConfigError, config_to_dict, resolve_dtype, save_config, validate
from megaevo.data.blended import build_datasets
from megaevo.data.sampler import MicroBatchSampler, collate
from megaevo.model.args import ModelArgs
from megaevo.model.llama import build_chunks
from megaevo.parallel import compat
from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.layers import allreduce_sequence_parallel_grads
from megaevo.parallel.pipeline import PipelineEngine, StepStats
from megaevo.parallel.state import init_parallel_state
from megaevo.training.checkpoint import Checkpointer, CheckpointError, LoadedCheckpoint, SavePlan, set_rng_state
from megaevo.training.optimizer import STATE_KINDS, DistributedAdamW
from megaevo.training.schedules import lr_at

MAX_BAD_STEPS = 5
# Model settings that change the function but not the shape of any weight.
_NUMERIC_MODEL_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Dense bf16 peak of the devices MFU is reported against, in FLOP/s.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus causal attention scores and values."""
    h, f, layers = args.hidden_size, args.ffn_hidden_size, args.num_layers
    kv = args.num_kv_heads * args.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    matmul = layers * per_layer + h * args.vocab_size
    attention = layers * 2 * seq_len * h  # QK^T and PV, halved by the causal mask, x2 for multiply-add
    return 6 * matmul + 3 * attention


@dataclass
class RunState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._init_distributed()
        self.layout = validate(cfg, self.world_size)
        kernels.set_backend(cfg.kernels.backend)
        kernels.set_autotune(cfg.kernels.autotune)
        self.state = init_parallel_state(tp=self.layout.tp, dp=self.layout.dp, pp=self.layout.pp,
                                         device_type=self.device.type,
                                         sequence_parallel=cfg.parallel.sequence_parallel)
        self.dtype = _DTYPES[resolve_dtype(cfg.train.dtype, self.device.type)]
        self.args = ModelArgs.from_config(cfg.model)
        self.seq_len = cfg.seq_len
        torch.manual_seed(cfg.train.seed)
        self.chunks = build_chunks(self.args, self.state, virtual_pp=self.layout.virtual_pp,
                                   layers_per_stage=cfg.parallel.pp_layers, seed=cfg.train.seed, device=self.device,
                                   dtype=self.dtype)
        self.model = self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        named = [(c, item) for c, chunk in enumerate(self.chunks) for item in chunk.named_parameters_with_meta()]
        self.metas = {n: m for _, (n, _, m) in named}
        self.params = {n: p for _, (n, p, _) in named}
        # Tied embeddings split over the pipeline: the copies on the first and last stage sum their gradients.
        self.tied_params = [p for n, p in self.params.items() if n == "embedding.weight"] \
            if self.args.tie_embeddings and self.state.pp_size > 1 else []
        sp = self.state.tp_size if self.state.sequence_parallel_active else 1
        self.pipeline = PipelineEngine(self.chunks, self.state,
                                       (cfg.train.micro_batch_size, self.seq_len // sp, self.args.hidden_size),
                                       self.dtype, self.device)
        self.last_step_stats: StepStats | None = None
        # Each chunk's buckets start reducing during its last backward; tied copies wait for the
        # sum across stages (finish_grad_sync starts them).
        chunk_of = {n: c for c, (n, _, _) in named}
        self.buffers = GradBuffers(self.params, self.state, self.dtype,
                                   bucket_size=int(cfg.parallel.bucket_size_mb * 2**20 / 4),
                                   distributed=cfg.parallel.distributed_optimizer,
                                   overlap=cfg.parallel.overlap_grad_reduce, groups=chunk_of,
                                   deferred={"embedding.weight"} if self.tied_params else set())
        o = cfg.optim
        self.optimizer = DistributedAdamW(self.buffers, self.metas, self.state, lr=o.lr, betas=tuple(o.betas),
                                          eps=o.eps, weight_decay=o.weight_decay, clip_grad=o.clip_grad)
        self.out_dir = Path(cfg.out_dir)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.rank, self.world_size,
                                         cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.run = RunState()
        self._build_data()
        self._peak = peak_flops(self.device)
        self._flops_per_token = flops_per_token(self.args, self.seq_len)

    # -- setup -------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def _build_data(self) -> None:
        t = self.cfg.train
        if not self.cfg.data.train:
            raise ConfigError("data.train is empty: give the training data, e.g. data.train=[1.0, path/to/prefix]")
        eval_samples = t.eval_iters * t.global_batch_size
        self.splits = build_datasets(self.cfg.data.train, self.seq_len, t.seed, t.iters * t.global_batch_size,
                                     eval_samples, None, self.cfg.data.split, self.cfg.data.valid or None,
                                     self.cfg.data.cache_dir)

    # -- one step ----------------------------------------------------------------------------------
    def _micro_batches(self, dataset, consumed: int, count: int):
        sampler = MicroBatchSampler(consumed + count * self.cfg.train.micro_batch_size * self.state.dp_size,
                                    consumed, self.cfg.train.micro_batch_size, self.state.dp_rank, self.state.dp_size)
        for indices in sampler:
            batch = collate([dataset[i] for i in indices])
            top = int(batch["tokens"].max())
            if top >= self.args.vocab_size:
                raise ConfigError(f"the data holds token id {top} but model.vocab_size is {self.args.vocab_size}: "
                                  f"use the tokenizer the model was sized for, or raise model.vocab_size")
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _mean_loss(self, losses: list[torch.Tensor], count: int) -> float:
        """The mean of the micro-batch losses of the last stage over ``count`` micro-batches and every DP rank."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for loss in losses:
            total += loss / count
        if self.state.pp_group is not None:  # only the last stage has losses; the others add zero
            compat.all_reduce(total, group=self.state.pp_group)
        if self.state.dp_group is not None:
            compat.all_reduce(total, group=self.state.dp_group)
            total /= self.state.dp_size
        return total.item()

    def train_step(self) -> dict:
        n_micro = self.layout.micro_batches_per_step
        lr = lr_at(self.run.iteration, self.cfg.optim, self.cfg.train.iters)
        self.buffers.zero_grad()
        self.model.train()
        batches = list(self._micro_batches(self.splits.train, self.run.consumed_samples, n_micro))
        stats = self.pipeline.run(batches, no_sync=self.buffers.no_sync)
        self.last_step_stats = stats
        for p in self.tied_params:
            compat.all_reduce(p.main_grad, group=self.state.embedding_group)
        self.buffers.finish_grad_sync()
        allreduce_sequence_parallel_grads(self.params.values(), self.state, grad_attr="main_grad")
        loss = self._mean_loss(stats.losses, n_micro)
        result = self.optimizer.step(lr) if math.isfinite(loss) else None
        skipped = result is None or result.skipped
        self.run.consumed_samples += self.cfg.train.global_batch_size
        self.run.iteration += 1
        if skipped:
            self.run.skipped_steps += 1
            self.run.bad_in_a_row += 1
        else:
            self.run.bad_in_a_row = 0
        return {"loss": loss, "lr": lr, "grad_norm": result.grad_norm if result else float("nan"), "skipped": skipped}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out = {}
        t = self.cfg.train
        for name, ds in self.splits.valid.items():
            steps = min(t.eval_iters, len(ds) // t.global_batch_size)
            if steps == 0:
                continue
            batches = list(self._micro_batches(ds, 0, steps * self.layout.micro_batches_per_step))
            stats = self.pipeline.run(batches, forward_only=True)
            out[f"val/{name}"] = self._mean_loss(stats.losses, len(batches))
        self.model.train()
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        s, it = self.state, self.run.iteration
        model = {}
        for name, p in self.params.items():
            meta = self.metas[name]
            frags = [] if (meta.tp_replicated and s.tp_rank != 0) else meta.fragments(p.shape)
            model[name] = (p.detach(), frags)
        tensors = {"model": model}
        optim = self.optimizer.local_state()  # collective over DP with the distributed optimizer
        for kind in STATE_KINDS:
            tensors[kind] = {n: (optim[n][kind], model[n][1]) for n in self.params}
        metadata = {
            "consumed_samples": self.run.consumed_samples,
            "tokens": self.run.consumed_samples * self.seq_len,
            "optimizer_step": self.optimizer.step_count,
            "skipped_steps": self.run.skipped_steps,
            "scheduler": {"iteration": it, "schedule": self.cfg.optim.schedule},
            "layout": {"tp": s.tp_size, "pp": s.pp_size, "dp": s.dp_size, "virtual_pp": len(self.chunks),
                       "distributed_optimizer": self.buffers.distributed, "dtype": str(self.dtype)},
            "config": config_to_dict(self.cfg),
        }
        plan = SavePlan(it, tensors, {n: m.logical_shape for n, m in self.metas.items()}, self.rank,
                        self.world_size, writer=s.dp_rank == 0, file_tag=f"tp{s.tp_rank}_pp{s.pp_rank}",
                        metadata=metadata)
        self.checkpointer.save(plan)

    def _local(self, ck: LoadedCheckpoint, kind: str, name: str) -> torch.Tensor:
        """This rank's shard of a logical tensor, read from the fragments that overlap it (padding rows zero)."""
        meta, p = self.metas[name], self.params[name]
        ck.shape(kind, name, meta.logical_shape)
        local = None
        for frag in meta.fragments(p.shape):
            block = ck.region(kind, name, frag.logical_offset, frag.shape)
            if local is None:
                local = torch.zeros(p.shape, dtype=block.dtype)
            frag.local_view(local).copy_(block)
        return local if local is not None else torch.zeros(p.shape)  # a shard of padding rows only

    def _warn_on_model_changes(self, ck: LoadedCheckpoint) -> None:
        """Say which settings the checkpoint's model had differently that the tensor shapes cannot show
        (e.g. rope_theta), in case the change is not meant (it may be: longer-context CPT)."""
        saved = (ck.meta.get("config") or {}).get("model") or {}
        ours = config_to_dict(self.cfg)["model"]
        changed = [f"model.{k}: {saved[k]!r} in the checkpoint, {ours[k]!r} here" for k in _NUMERIC_MODEL_FIELDS
                   if k in saved and saved[k] != ours.get(k)]
        if changed:
            self._print(f"warning: {ck.path} was saved with other model settings: " + "; ".join(changed))

    def load(self, path: Path, weights_only: bool = False) -> None:
        """Load a checkpoint saved in any layout; `weights_only` keeps iteration 0 and a fresh optimizer."""
        ck = LoadedCheckpoint(path)
        self._warn_on_model_changes(ck)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self._local(ck, "model", name).to(p.dtype))
            if not ck.has("master"):  # e.g. an imported model: master weights start from the weights
                self.optimizer.reset_master()
            else:
                kinds = ("master",) if weights_only else STATE_KINDS
                if not all(ck.has(k) for k in kinds):
                    raise CheckpointError(f"{path}: optimizer state is incomplete (has {sorted(ck.meta['tensors'])})")
                local = {name: {k: (self._local(ck, k, name) if k in kinds else torch.zeros(p.shape))
                                for k in STATE_KINDS} for name, p in self.params.items()}
                step = 0 if weights_only else ck.meta.get("optimizer_step", ck.iteration)
                self.optimizer.load_local_state(local, step)
        if weights_only:
            return
        self.run = RunState(ck.iteration, int(ck.meta["consumed_samples"]), int(ck.meta.get("skipped_steps", 0)))
        s, saved = self.state, ck.meta.get("layout", {})
        same_layout = ck.meta.get("world_size") == self.world_size and (saved.get("tp"), saved.get("pp"),
                                                                         saved.get("virtual_pp", 1)) == \
            (s.tp_size, s.pp_size, len(self.chunks))
        rng = ck.rng(self.rank) if same_layout else None
        if rng is not None:
            set_rng_state(rng)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        own = self.checkpointer.resolve("auto") if cfg.checkpoint.load else None
        if cfg.checkpoint.finetune and own is not None:  # the fine-tuning run restarts from its own checkpoint
            self.load(own)
            self._print(f"resumed from {own} at iteration {self.run.iteration}")
        elif cfg.checkpoint.load:
            path = self.checkpointer.resolve(cfg.checkpoint.load)
            if path is not None:
                self.load(path, weights_only=cfg.checkpoint.finetune)
                self._print(f"loaded the weights of {path}" if cfg.checkpoint.finetune else
                            f"resumed from {path} at iteration {self.run.iteration}")
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        log_path = self.out_dir / "metrics.jsonl"
        board = _tensorboard(self.out_dir / "tensorboard") if self.rank == 0 else None
        records = []
        t_last, tokens_since = time.perf_counter(), 0
        while self.run.iteration < cfg.train.iters:
            stats = self.train_step()
            tokens_since += cfg.train.global_batch_size * self.seq_len
            it = self.run.iteration
            record = None
            if it % cfg.train.log_interval == 0 or it == cfg.train.iters:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                record = {"step": it, "consumed_samples": self.run.consumed_samples,
                          "tokens": self.run.consumed_samples * self.seq_len, "loss": stats["loss"],
                          "lr": stats["lr"], "grad_norm": stats["grad_norm"], "tokens_per_s": tps,
                          "mfu": (tps * self._flops_per_token / (self._peak * self.world_size)) if self._peak else None,
                          "mem_gb": _memory_gb(self.device), "skipped_steps": self.run.skipped_steps}
            if cfg.train.eval_interval and (it % cfg.train.eval_interval == 0 or it == cfg.train.iters):
                record = (record or {"step": it, "consumed_samples": self.run.consumed_samples})
                record.update(self.evaluate())
            if record is None and self.run.bad_in_a_row >= MAX_BAD_STEPS:
                record = {"step": it, "consumed_samples": self.run.consumed_samples, **stats,
                          "skipped_steps": self.run.skipped_steps}
            if record is not None:
                records.append(record)
                if self.rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    self._print(_describe(record, cfg.train.iters))
                    if board is not None:
                        for k, v in record.items():
                            if isinstance(v, (int, float)) and k != "step":
                                board.add_scalar(k, v, it)
            if self.run.bad_in_a_row >= MAX_BAD_STEPS:
                self.checkpointer.wait()
                raise RuntimeError(f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient norm (last at "
                                   f"iteration {it}); stopping. The last good checkpoint is intact; lower optim.lr or "
                                   f"check the data, then resume with checkpoint.load=auto")
            if cfg.checkpoint.save and ((cfg.checkpoint.interval and it % cfg.checkpoint.interval == 0)
                                        or it == cfg.train.iters):
                self.save()
        self.checkpointer.wait()
        if board is not None:
            board.close()
        return records

    def _print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


def _tensorboard(path: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return 0.0


def _describe(r: dict, iters: int) -> str:
    parts = [f"step {r['step']:>6}/{iters}"]
    if "loss" in r:
        parts += [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"grad {r['grad_norm']:.3f}"]
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if "mem_gb" in r:
            parts.append(f"mem {r['mem_gb']:.2f} GB")
        if r.get("skipped_steps"):
            parts.append(f"skipped {r['skipped_steps']}")
    parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val/")]
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from megaevo.config import load_config

    p = argparse.ArgumentParser(prog="megaevo train", description="train (single process, or under torchrun)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optim.lr=3e-4")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
