"""Rollouts: the run's prompts in order, sampling a step's responses with the live policy, and the
per-token tensors the losses read.

* **Prompts** (:func:`load_prompt_set`): the records of ``rl.prompts`` rendered by ``rl.template`` as one
  user turn (the token ids SFT and evaluation give the same prompt); prompts longer than
  ``rl.max_prompt_len`` tokens are left out (counted in the log).
* **Order** (:class:`PromptStream`): pass ``e`` over the prompt set is a permutation seeded by
  (train.seed, e); the run reads pass after pass. A position in this stream is the count of consumed
  prompts, saved in checkpoints, so a resumed run reads what an uninterrupted one reads. A step's
  ``prompts_per_step`` prompts are split over data parallelism in contiguous blocks, so the samples of
  one prompt (a GRPO group) stay on one rank.
* **Sampling** (:func:`sample_responses`): each rank generates its prompts in generation batches, each
  prompt ``n`` times, on its tensor-parallel shard of the live model (TP ranks continue with the same
  tokens). A generation batch draws from one random stream seeded by (train.seed, iteration, the global
  stream position of its first prompt); the sampler draws per batch, not per row, so the batch's
  content fixes the samples too (``rl.generation_batch`` makes it layout-independent).
* **Alignment** (:func:`rollout_tensors`): a sample is its prompt and response back to back,
  right-padded. Per-token tensors are aligned to the *label* positions of the training forward:
  position ``t`` holds what concerns token ``t + 1`` (its log-probability, the value of the state
  before it, its reward), and ``mask[t]`` is 1 where token ``t + 1`` is a response token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megaevo.common import IGNORE_INDEX
from megaevo.config import ConfigError
from megaevo.data.templates import get_template
from megaevo.inference.generate import generate_rows
from megaevo.log import get_logger
from megaevo.parallel.state import ParallelState
from megaevo.stages.rl.rewards import load_prompts

log = get_logger(__name__)


@dataclass
class PromptSet:
    """The prompt records a run samples from and the token ids of each."""

    records: list[dict]
    ids: list[list[int]]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.records)


def load_prompt_set(specs, tokenizer, template: str, max_prompt_len: int, data_dir: str | None = None) -> PromptSet:
    """The records of ``specs`` (:func:`~megaevo.stages.rl.rewards.load_prompts`) rendered by ``template``;
    those over ``max_prompt_len`` tokens left out."""
    chat = get_template(template, tokenizer)
    records, ids, dropped = [], [], 0
    for record in load_prompts(specs, data_dir):
        prompt = chat.prompt_ids(tokenizer, [{"role": "user", "content": record["problem"]}])
        if len(prompt) > max_prompt_len:
            dropped += 1
            continue
        records.append(record)
        ids.append(prompt)
    if not records:
        raise ConfigError(f"rl.prompts: no prompt of {list(specs)} fits rl.max_prompt_len={max_prompt_len} tokens "
                          f"({dropped} left out as longer)")
    return PromptSet(records, ids, dropped)


def seed_for(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across processes and versions)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) % 2**63


class PromptStream:
    """The run's prompts, pass after pass over seeded permutations, positioned by consumed prompts."""

    def __init__(self, size: int, seed: int, per_step: int, state: ParallelState):
        if per_step % state.dp_size:
            raise ConfigError(f"rl.prompts_per_step={per_step} is not divisible by the data-parallel size "
                              f"{state.dp_size}: each rank samples a whole share of the prompts")
        self.size, self.seed, self.per_step, self.state = size, seed, per_step, state
        self.consumed = 0
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, 0x524C, epoch]).permutation(self.size)
        return self._orders[epoch]

    def record(self, position: int) -> int:
        """The prompt record at stream position ``position``."""
        return int(self.order(position // self.size)[position % self.size])

    def next_step(self) -> list[tuple[int, int]]:
        """This DP rank's share of the next step: ``(stream position, record index)`` per prompt."""
        share = self.per_step // self.state.dp_size
        first = self.consumed + self.state.dp_rank * share
        self.consumed += self.per_step
        return [(p, self.record(p)) for p in range(first, first + share)]


@torch.no_grad()
def sample_responses(chunk, state: ParallelState, prompts: list[list[int]], positions: list[int], params,
                     batch_prompts: int, seed: int, iteration: int, tokenizer, stop_ids) -> list:
    """``params.n`` completions of each prompt (grouped by prompt), generated ``batch_prompts`` prompts at a
    time; see the module's doc for the seeding."""
    device = next(chunk.parameters()).device
    chunk.rope_tables(device)  # built outside inference mode: the training forward saves them for backward
    out = []
    for start in range(0, len(prompts), batch_prompts):
        group = prompts[start:start + batch_prompts]
        generator = torch.Generator(device=device)
        generator.manual_seed(seed_for(seed, iteration, positions[start]))
        rows = [p for p in group for _ in range(params.n)]
        out += generate_rows(chunk, state, rows, params, tokenizer=tokenizer, stop_ids=stop_ids, generator=generator)
    return out


def rollout_tensors(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                    pad_to: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded (rows, width) tensors of the samples ``prompt + response``: ``tokens``, ``labels`` (the
    next token on response positions, else -100), ``mask`` (1.0 on those positions), ``rollout_logp`` (the
    sampler's log-probabilities there); and ``lengths`` (rows,). ``width`` is a multiple of ``pad_to``."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = -(-max(lengths) // pad_to) * pad_to
    rows = len(prompts)
    tokens = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    logp = torch.zeros(rows, width, dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        seq = torch.tensor(list(p) + list(r), dtype=torch.long)
        tokens[i, :len(seq)] = seq
        if r:
            labels[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
            logp[i, len(p) - 1:len(seq) - 1] = torch.tensor(lp, dtype=torch.float32)
    mask = (labels != IGNORE_INDEX).float()
    return {"tokens": tokens, "labels": labels, "mask": mask, "rollout_logp": logp,
            "lengths": torch.tensor(lengths, dtype=torch.long)}
