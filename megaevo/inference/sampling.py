"""Sampling settings, completions, and the pure functions that turn logits into the next token.

Semantics follow Hugging Face ``generate`` and vLLM: the repetition penalty divides the positive
and multiplies the negative logits of every token already in the prompt or the output; then
temperature, top-k, top-p (nucleus, keeping at least one token). Temperature 0 is greedy: the
argmax after the repetition penalty. A completion's ``logprobs`` are the log-softmax of the raw
model logits (before any of these) at the chosen tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to generate. ``stop_token_ids`` None means the tokenizer's EOS; ``max_length`` caps
    prompt + generated tokens (default and upper bound: the model's ``max_seq_len``); ``n``
    completions per prompt; ``add_bos`` prepends the tokenizer's BOS to text prompts."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    max_length: int | None = None
    add_bos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length must be >= 1, got {self.max_length}")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))


@dataclass
class Completion:
    """One generated sample. ``finish_reason`` is ``stop`` (a stop token or stop string) or ``length``.
    ``token_ids`` include a stop token and the token completing a stop string; ``text`` ends before
    either."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "logprobs": self.logprobs, "finish_reason": self.finish_reason}


def apply_repetition_penalty(logits: torch.Tensor, seen_ids, penalty: float) -> torch.Tensor:
    """``logits`` (batch, vocab) with every seen token's logit divided by ``penalty`` when positive,
    multiplied when negative. ``seen_ids``: a bool mask (batch, vocab), or token ids per row (a
    LongTensor (batch, n) or a list of lists; repeats count once)."""
    if penalty == 1.0:
        return logits
    mask = seen_mask(seen_ids, logits.shape, logits.device)
    rows, cols = mask.nonzero(as_tuple=True)  # only the seen logits change: a few per row of the vocabulary
    seen = logits[rows, cols]
    out = logits.clone()
    out[rows, cols] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def seen_mask(seen_ids, shape, device) -> torch.Tensor:
    if isinstance(seen_ids, torch.Tensor) and seen_ids.dtype == torch.bool:
        return seen_ids.to(device)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if isinstance(seen_ids, torch.Tensor):
        return mask.scatter_(1, seen_ids.to(device=device, dtype=torch.long), True)
    for row, ids in enumerate(seen_ids):
        if len(ids):
            mask[row, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return mask


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` (batch, vocab) with everything outside the ``top_k`` largest (0 = off; ties with the
    k-th kept) and outside the smallest set whose probability reaches ``top_p`` set to -inf.
    At least one token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen=None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-probability under the raw ``logits`` (batch, vocab).

    ``seen``: what :func:`apply_repetition_penalty` takes (the prompt and output tokens so far)."""
    raw = logits
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        logits = filter_top_k_top_p(logits.float() / params.temperature, params.top_k, params.top_p)
        tokens = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return tokens, chosen_logprobs(raw, tokens)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` (batch, vocab) at ``tokens`` (batch,), float32 (one fused
    log-softmax pass is faster on the CPU than a separate log-sum-exp)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
