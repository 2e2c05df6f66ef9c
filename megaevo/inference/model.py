"""``megaevo.load``: a megaevo checkpoint or a Hugging Face Llama/Mistral/Qwen2 directory, ready to
score and generate on this rank's tensor-parallel share of the model.

Under ``torchrun`` (WORLD_SIZE > 1) the process group is joined as the trainer joins it; TP is the
world size unless given, and the remaining data-parallel ranks split the prompts of
:meth:`Model.generate` (every rank gets every completion back). Pipeline parallelism is not used
for inference.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from megaevo.checkpoint import LoadedCheckpoint, load_local_weights, resolve_checkpoint
from megaevo.checkpoint.safetensors_io import DTYPES
from megaevo.common import torch_dtype
from megaevo.config import config_from_dict
from megaevo.convert.hf import hf_tensors, is_hf_dir, read_hf_config, tensor_links
from megaevo.convert.hf_config import spec_from_hf_config
from megaevo.data.tokenizer_files import (TokenizerNotFound, not_found_message, require_tokenizer, tokenizer_candidates,
                                          tokenizer_files)
from megaevo.data.tokenizers import load_tokenizer
from megaevo.errors import UserError
from megaevo.model.args import ModelArgs
from megaevo.model.fusion import join_parts
from megaevo.model.llama import LlamaStage
from megaevo.parallel.distributed import init_distributed
from megaevo.parallel.layers import gather_vocab_logits
from megaevo.parallel.state import ParallelState, init_parallel_state

from .generate import generate_rows
from .sampling import Completion, SamplingParams

logger = logging.getLogger(__name__)
MAX_BATCH_ROWS = 256  # rows generated together; more prompts x n run in several batches


@dataclass
class Model:
    """A loaded model on this rank: ``chunk`` (the model chunk holding the whole decoder, this rank's TP
    shard), its shape ``args``, ``state``, ``device``, ``dtype``, and ``tokenizer`` (None when none was
    found; ``tokenizer_error`` then says where it was looked for)."""

    chunk: LlamaStage
    args: ModelArgs
    state: ParallelState
    device: torch.device
    dtype: torch.dtype
    tokenizer: object = None
    eos_ids: tuple[int, ...] = ()  # the default stop tokens: the tokenizer's EOS (and generation_config.json's)
    path: Path | None = None
    max_batch_rows: int = field(default=MAX_BATCH_ROWS)
    tokenizer_error: str | None = None

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary logits (batch, seq, vocab_size), float32, the same on every TP rank."""
        tokens = self._tokens(tokens)
        local = self.chunk(tokens, position_ids=_to(position_ids, self.device), doc_ids=_to(doc_ids, self.device))
        return gather_vocab_logits(local, self.state, self.args.vocab_size).float()

    __call__ = forward

    def logprobs(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels[b, t] | tokens[b, :t+1]), float32 (batch, seq); 0 where ``labels == -100``.
        The vocabulary is never gathered: the head's vocab-parallel loss gives it per token."""
        tokens = self._tokens(tokens)
        loss = self.chunk(tokens, _to(labels, self.device))
        return loss.neg() + 0.0  # +0.0: ignored positions are 0, not -0

    def generate(self, prompts, params: SamplingParams | None = None) -> list[list[Completion]]:
        """``params.n`` completions for each prompt (a string, or a list of token ids), in prompt order,
        on every rank. Data-parallel ranks each generate a share of the prompts."""
        params = params or SamplingParams()
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("Model.generate: prompts must be a list of prompts (strings or lists of token ids)")
        encoded = [self._encode(p, params) for p in prompts]
        stop_ids = set(self.eos_ids if params.stop_token_ids is None else params.stop_token_ids)
        if params.stop:
            require_tokenizer(self, "a stop string")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            generator.manual_seed(seed + 1_000_003 * self.state.dp_rank)
        dp, rank = self.state.dp_size, self.state.dp_rank
        mine = list(range(rank, len(encoded), dp))
        rows = [encoded[i] for i in mine for _ in range(params.n)]
        done: list[Completion] = []
        self.chunk.eval()
        for start in range(0, len(rows), self.max_batch_rows):
            done += generate_rows(self.chunk, self.state, rows[start:start + self.max_batch_rows], params,
                                  tokenizer=self.tokenizer, stop_ids=stop_ids, generator=generator)
        results: dict[int, list[Completion]] = {i: done[k * params.n:(k + 1) * params.n] for k, i in enumerate(mine)}
        if dp > 1:
            shares = [None] * dp
            dist.all_gather_object(shares, [(i, [c.to_json() for c in cs]) for i, cs in results.items()],
                                   group=self.state.dp_group)
            results = {i: [Completion(**c) for c in cs] for share in shares for i, cs in share}
        return [results[i] for i in range(len(encoded))]

    def _encode(self, prompt, params: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            ids = list(require_tokenizer(self, "a text prompt (or give token ids)").encode(prompt))
            if params.add_bos:
                if self.tokenizer.bos_id is None:
                    raise ValueError("SamplingParams.add_bos: the tokenizer has no BOS token")
                ids = [self.tokenizer.bos_id] + ids
        else:
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise ValueError("Model.generate: a prompt is empty (give it text or set add_bos)")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"Model.generate: token id(s) {bad[:5]} outside the model's vocabulary "
                             f"[0, {self.args.vocab_size})")
        return ids

    def _tokens(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Model: tokens must be integer (batch, seq), got {tuple(tokens.shape)} {tokens.dtype}")
        return tokens.long()


def _to(t, device):
    return None if t is None else torch.as_tensor(t, device=device)


# ------------------------------------------------------------------------------------------------ loading


def load(path: str | os.PathLike, *, tp: int | None = None, device=None, dtype=None, pp: int = 1,
         require_tokenizer: bool = False) -> Model:
    """The model in ``path``: a megaevo checkpoint (a run directory, its checkpoints folder or one
    ``iter_`` directory) or a Hugging Face Llama/Mistral/Qwen2 directory (safetensors).

    ``dtype`` defaults to the stored weights' dtype on a GPU and float32 on the CPU. ``tp`` > 1
    needs that many processes per model (``torchrun --nproc_per_node``).

    The tokenizer is the checkpoint's own copy or the one its run recorded (see
    :mod:`megaevo.data.tokenizer_files`), or a Hugging Face directory's files. When a checkpoint's
    recorded tokenizer is nowhere, a warning names the places tried and the model takes token ids
    only; with ``require_tokenizer`` that is a :class:`~megaevo.data.tokenizer_files.TokenizerNotFound`
    instead."""
    if pp != 1:
        raise UserError(f"megaevo.load: pipeline parallelism (pp={pp}) is not supported for inference; "
                        "use tensor parallelism (tp) and data parallelism instead")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (give a run, its checkpoints folder, an iter_ directory or a "
                        f"Hugging Face model directory)")
    state, default_device = _parallel_state(tp)
    device = torch.device(device) if device is not None else default_device
    source = _hf_source(path) if is_hf_dir(path) else _checkpoint_source(path)
    tokenizer, missing = _load_tokenizer(source["tokenizers"], source["path"], require_tokenizer,
                                         warn=source.get("recorded", False))
    args = source["args"].replace(recompute="none")
    args.validate(state.tp_size)
    if dtype is None:
        dtype = source["dtype"] if device.type == "cuda" else torch.float32
    try:
        dtype = torch_dtype(dtype, what="megaevo.load")
    except ValueError as e:
        raise UserError(str(e)) from None
    chunk = _empty_chunk(args, state, device, dtype)
    with torch.no_grad():
        source["fill"](chunk)
    chunk.requires_grad_(False).eval()
    eos = list(source.get("eos", []))
    if tokenizer is not None and tokenizer.eos_id is not None:
        eos.insert(0, tokenizer.eos_id)
    return Model(chunk, args, state, device, dtype, tokenizer, tuple(dict.fromkeys(eos)), source["path"],
                 tokenizer_error=missing)


def _empty_chunk(args: ModelArgs, state: ParallelState, device: torch.device, dtype: torch.dtype) -> LlamaStage:
    """The model with uninitialised weights (no random init: they are about to be loaded), its
    parameters keeping their layout tags."""
    chunk = LlamaStage(args, state, device="meta", dtype=dtype)
    tags = {n: dict(vars(p)) for n, p in chunk.named_parameters()}
    chunk.to_empty(device=device)
    for n, p in chunk.named_parameters():
        for k, v in tags[n].items():
            setattr(p, k, v)
    return chunk


def _parallel_state(tp: int | None) -> tuple[ParallelState, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or (dist.is_available() and dist.is_initialized()):
        _, world, device = init_distributed()
        tp = world if tp is None else tp
        if not isinstance(tp, int) or tp < 1 or world % tp:
            raise UserError(f"megaevo.load: tp={tp} must divide the world size {world}")
        return init_parallel_state(tp=tp, dp=world // tp, pp=1), device
    if tp not in (None, 1):
        raise UserError(f"megaevo.load: tp={tp} needs {tp} processes; launch with "
                        f"torchrun --nproc_per_node {tp} (one process runs tp=1)")
    return ParallelState.single(), torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _checkpoint_source(path: Path) -> dict:
    ck = LoadedCheckpoint(resolve_checkpoint(path))
    args = ModelArgs.from_config(config_from_dict(ck.meta["config"]).model)
    dtypes = {e.torch_dtype for e in ck.record.tensors.get("model", {}).values()}
    stored = dtypes.pop() if len(dtypes) == 1 else torch.float32

    def fill(chunk: LlamaStage) -> None:
        named = chunk.named_parameters_with_meta()
        load_local_weights(ck, {n: p for n, p, _ in named}, {n: m for n, _, m in named})

    data = (ck.record.config or {}).get("data") or {}
    recorded = data.get("tokenizer") if isinstance(data.get("tokenizer"), str) else None
    return {"args": args, "dtype": stored, "fill": fill, "tokenizers": tokenizer_candidates(ck.path, recorded),
            "path": ck.path, "recorded": recorded is not None}


def _hf_source(path: Path) -> dict:
    raw = read_hf_config(path)
    args = ModelArgs(**spec_from_hf_config(raw, str(path / "config.json")).model)
    tensors = hf_tensors(path)
    links = tensor_links(args)
    missing = [k for _, names, _ in links for k in names if k not in tensors]
    if missing:
        raise UserError(f"{path}: tensor(s) missing for the model config.json describes: {', '.join(missing[:6])}")
    kinds = {tensors[k].dtype for _, names, _ in links for k in names}
    unreadable = sorted(d for d in kinds if d not in DTYPES or not DTYPES[d].is_floating_point)
    if unreadable:
        raise UserError(f"{path}: weights of dtype {', '.join(unreadable)} cannot be loaded (expected floating-point "
                        f"weights: F32, BF16, F16)")
    stored = DTYPES[tensors[links[0][1][0]].dtype]

    def fill(chunk: LlamaStage) -> None:
        params = {n: (p, m) for n, p, m in chunk.named_parameters_with_meta()}
        with ExitStack() as stack:
            files = {}

            def get(key: str) -> torch.Tensor:
                f = tensors[key].file
                if f not in files:
                    files[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                return files[f].get_tensor(key)

            for name, hf_names, how in links:
                full = join_parts(how, [get(k) for k in hf_names], args)
                param, meta = params[name]
                if tuple(full.shape) != tuple(meta.logical_shape):
                    raise UserError(f"{tensors[hf_names[0]].file}: {hf_names[0]} has shape {list(full.shape)}, "
                                    f"config.json implies {list(meta.logical_shape)}")
                local = meta.layout.shard(full, meta.tp_rank, meta.tp_size)
                param.zero_()  # padded vocab rows stay 0
                param[tuple(slice(0, n) for n in local.shape)].copy_(local.to(param.dtype))

    eos = []
    gen = path / "generation_config.json"
    for cfg in ([raw] + ([json.loads(gen.read_text(encoding="utf-8"))] if gen.is_file() else [])):
        ids = cfg.get("eos_token_id")
        eos += [ids] if isinstance(ids, int) else [i for i in (ids or []) if isinstance(i, int)]
    return {"args": args, "dtype": stored, "fill": fill, "tokenizers": [path], "path": path, "eos": eos}


def _load_tokenizer(candidates: list[Path], source: Path, required: bool, warn: bool):
    """(the first candidate's tokenizer, None), or (None, a line saying where it was looked for): raised
    when ``required``, said as a warning when ``warn`` (the checkpoint recorded a tokenizer that is now
    nowhere)."""
    for c in candidates:
        if not tokenizer_files(c):
            continue
        try:
            return load_tokenizer(c), None
        except (ImportError, OSError, ValueError) as e:
            logger.warning("megaevo.load: tokenizer %s could not be read (%s)", c, e)
    message = not_found_message(str(source), candidates)
    if required:
        raise TokenizerNotFound(message)
    if warn:
        logger.warning("megaevo.load: %s; text prompts will not work (token ids do)", message)
    return None, message
