"""Batched generation with a KV cache on this rank's (tensor-parallel) model chunk.

Prompts of different lengths share one batch left-padded: padding has its own position ids
(clamped to 0), is its own document in the prefill attention and is masked out of the cache, so a
row's tokens do not depend on what else is in the batch. Each step gathers the full vocabulary's
logits of the last position, samples on every TP rank and broadcasts TP rank 0's tokens, so all
ranks of a TP group continue with the same tokens. Finished rows stay in the batch (their tokens
are computed and never read, so the batch keeps its size and the cache is not copied) until half
of them have finished; then they leave the batch and the cache. On one rank the decode steps run the
model on inference-only copies of its projections (:mod:`megaevo.model.decode`: packed weights on the
CPU). A prompt that leaves no room under ``model.max_seq_len`` (or ``max_length``) gets no tokens
(finish ``length``), with a warning that names its row and length.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaevo.log import get_logger
from megaevo.model.decode import decode_linears
from megaevo.model.llama import LlamaStage
from megaevo.parallel.layers import gather_vocab_logits
from megaevo.parallel.state import ParallelState

from .kv_cache import KVCache
from .sampling import Completion, SamplingParams, sample

log = get_logger(__name__)


class _Row:
    def __init__(self, prompt: list[int], budget: int):
        self.prompt, self.budget = prompt, budget
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text: str | None = None
        self.finish: str | None = None


@torch.inference_mode()
def generate_rows(chunk: LlamaStage, state: ParallelState, prompts: list[list[int]], params: SamplingParams, *,
                  tokenizer=None, stop_ids: set[int] = frozenset(), generator: torch.Generator | None = None
                  ) -> list[Completion]:
    """One completion per prompt (prompts already repeated ``n`` times), generated as one batch."""
    args = chunk.args
    cap = min(params.max_length or args.max_seq_len, args.max_seq_len)
    rows = [_Row(p, max(0, min(params.max_new_tokens, cap - len(p)))) for p in prompts]
    active = [i for i, r in enumerate(rows) if r.budget > 0]
    for r in rows:
        if r.budget == 0:
            r.finish, r.text = "length", ""
    if params.max_new_tokens > 0 and len(active) < len(rows) and state.tp_rank == 0:
        _warn_no_room(rows, cap, "max_length" if cap < args.max_seq_len else "model.max_seq_len")
    if active:
        _run(chunk, state, rows, active, params, tokenizer, stop_ids, generator)
    return [Completion(r.prompt, r.tokens, r.text if r.text is not None else _decode(tokenizer, r.tokens),
                       r.logprobs, r.finish) for r in rows]


def _run(chunk, state, rows, active, params, tokenizer, stop_ids, generator):
    device = next(chunk.parameters()).device
    lens = torch.tensor([len(rows[i].prompt) for i in active], device=device)
    width = int(lens.max())
    b = len(active)
    pad = width - lens
    cols = torch.arange(width, device=device)
    tokens = torch.zeros(b, width, dtype=torch.long, device=device)
    for j, i in enumerate(active):
        tokens[j, width - len(rows[i].prompt):] = torch.tensor(rows[i].prompt, device=device)
    real = cols[None, :] >= pad[:, None]
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)
    doc_ids = real.long() if bool((pad > 0).any()) else None
    max_new = max(rows[i].budget for i in active)
    key_mask = torch.cat([real, torch.ones(b, max_new, dtype=torch.bool, device=device)], dim=1)
    cache = KVCache.for_model(chunk, b, width + max_new, key_mask)

    vocab = chunk.args.vocab_size
    # Ids past the tokenizer's vocabulary (a model sized larger than its tokenizer) cannot be decoded:
    # they are never sampled.
    decodable = getattr(tokenizer, "vocab_size", None)
    decodable = decodable if decodable is not None and decodable < vocab else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        for j, i in enumerate(active):
            seen[j, torch.tensor(rows[i].prompt, device=device)] = True
    stops = tuple(params.stop)
    logits = chunk(tokens, position_ids=positions, doc_ids=doc_ids, kv_cache=cache, last_only=True)[:, -1]
    pos = lens[:, None]  # the next position of each row of the batch
    last_pos = chunk.args.max_seq_len - 1
    linears = decode_linears(chunk, b, max_new - 1)
    live = None  # batch rows still generating, when some finished rows are still in the batch
    while True:
        full = gather_vocab_logits(logits, state, vocab)
        if live is not None:
            full = full.index_select(0, live)
        if decodable is not None:
            full = full.clone()
            full[:, decodable:] = float("-inf")
        next_tokens, logprobs = sample(full, params, None if seen is None else seen_of(seen, live), generator)
        if state.tp_size > 1:  # every TP rank continues with rank 0's choice
            both = torch.stack([next_tokens.double(), logprobs.double()])
            dist.broadcast(both, src=dist.get_global_rank(state.tp_group, 0), group=state.tp_group)
            next_tokens, logprobs = both[0].long(), both[1].float()
        ids, lps = next_tokens.tolist(), logprobs.tolist()
        keep = []
        for j, i in enumerate(active):
            r = rows[i]
            r.tokens.append(ids[j])
            r.logprobs.append(lps[j])
            if ids[j] in stop_ids:
                r.finish, r.text = "stop", _decode(tokenizer, r.tokens[:-1])
            elif stops:
                text = _decode(tokenizer, r.tokens)
                cut = min((k for k in (text.find(s) for s in stops) if k >= 0), default=-1)
                if cut >= 0:
                    r.finish, r.text = "stop", text[:cut]
            if r.finish is None and len(r.tokens) >= r.budget:
                r.finish = "length"
            if r.finish is None:
                keep.append(j)
        if not keep:
            return
        slots = torch.arange(b, device=device) if live is None else live  # batch row of each active row
        if len(keep) < len(active):
            kept = torch.tensor(keep, device=device)
            slots, next_tokens = slots.index_select(0, kept), next_tokens.index_select(0, kept)
            active = [active[j] for j in keep]
        if len(active) * 2 <= b:  # compact: finished rows leave the batch (and the cache)
            cache.keep(slots)
            pos = pos.index_select(0, slots)
            if seen is not None:
                seen = seen.index_select(0, slots)
            b, live = len(active), None
            slots = torch.arange(b, device=device)
            linears = decode_linears(chunk, b, max(rows[i].budget - len(rows[i].tokens) for i in active))
            batch_tokens = next_tokens
        elif len(active) < b:  # finished rows stay in the batch (their tokens are never read) until half are
            live = slots
            batch_tokens = torch.zeros(b, dtype=next_tokens.dtype, device=device).index_copy_(0, slots, next_tokens)
        else:
            batch_tokens = next_tokens
        if seen is not None:
            seen.index_put_((slots, next_tokens), torch.ones((), dtype=torch.bool, device=device))
        logits = chunk(batch_tokens[:, None], position_ids=pos, kv_cache=cache, linears=linears)[:, -1]
        pos = (pos + 1).clamp_(max=last_pos)  # a finished row kept in the batch may run past its length


def _warn_no_room(rows: list[_Row], cap: int, limit: str) -> None:
    full = [(i, len(r.prompt)) for i, r in enumerate(rows) if r.budget == 0]
    shown = ", ".join(f"row {i}: {n} tokens" for i, n in full[:3]) + (", ..." if len(full) > 3 else "")
    log.warning(f"generate: {len(full)} of {len(rows)} prompt(s) leave no room to generate within {limit}={cap} "
                f"({shown}); they get 0 tokens (finish 'length')")


def seen_of(seen: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    return seen if live is None else seen.index_select(0, live)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None and ids else ""
