"""Language-modelling loss on an indexed dataset (``name.bin`` + ``name.idx``).

The documents (the first ``limit`` of them) are concatenated in order, as pre-training reads them
(attention crosses document boundaries), and cut into consecutive windows of ``seq_len + 1`` tokens
that overlap by one token, like GPT training samples: window ``k`` feeds tokens
``[k*seq_len, (k+1)*seq_len)`` and predicts each next token, so every token but the first is
predicted exactly once and the last window may be shorter. ``loss`` is the mean next-token negative
log-likelihood over all predicted tokens, ``ppl = exp(loss)``, ``tokens`` their count.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaevo.errors import UserError

from .multiple_choice import IGNORE, _device, _progress


@dataclass
class LossTask:
    """The concatenated tokens of an indexed dataset prefix; :meth:`run` measures a model's loss on them."""

    name: str
    tokens: np.ndarray
    seq_len: int | None = None

    def windows(self, seq_len: int) -> list[np.ndarray]:
        """Consecutive windows of ``seq_len + 1`` tokens overlapping by one (the last may be shorter)."""
        n = len(self.tokens)
        return [self.tokens[s:s + seq_len + 1] for s in range(0, max(n - 1, 0), seq_len)]

    def run(self, model, batch_size: int = 8, progress: bool = True) -> dict:
        max_len = int(model.args.max_seq_len)
        seq_len = self.seq_len or max_len
        if seq_len > max_len:
            raise UserError(f"loss task {self.name}: seq_len {seq_len} exceeds the model's max_seq_len {max_len}")
        windows = self.windows(seq_len)
        device = _device(model)
        total, count, samples = 0.0, 0, []
        batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        for b_idx, batch in enumerate(_progress(batches, progress, self.name)):
            width = max(len(w) for w in batch) - 1
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for r, w in enumerate(batch):
                w = torch.from_numpy(w.astype(np.int64))
                tokens[r, :len(w) - 1] = w[:-1]
                labels[r, :len(w) - 1] = w[1:]
            tokens, labels = tokens.to(device), labels.to(device)
            with torch.no_grad():
                lp = model.logprobs(tokens, labels).double() * (labels != IGNORE)
            for r, w in enumerate(batch):
                nll, n = -float(lp[r].sum()), len(w) - 1
                total += nll
                count += n
                samples.append({"index": b_idx * batch_size + r, "tokens": n, "loss": nll / n})
        loss = total / count if count else math.nan
        metrics = {"n": len(windows), "loss": loss, "ppl": math.exp(loss) if count else math.nan, "tokens": count}
        return {"metrics": metrics, "samples": samples}


def load_task(prefix: str | os.PathLike, limit: int | None = None, seq_len: int | None = None) -> LossTask:
    """The first ``limit`` documents (all by default) of the indexed dataset at ``prefix``."""
    from megaevo.data.indexed import IndexedDataset

    if seq_len is not None and seq_len < 1:
        raise UserError(f"loss task {prefix}: seq_len must be at least 1, got {seq_len}")
    data = IndexedDataset(prefix)
    docs = data.num_documents if limit is None else min(limit, data.num_documents)
    end = int(data.document_indices[docs])
    parts = [data.get(i) for i in range(end)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, data.dtype)
    if len(tokens) < 2:
        raise UserError(f"{data.idx_path}: needs at least two tokens to measure a loss, has {len(tokens)}")
    return LossTask(name=Path(data.prefix).name, tokens=tokens, seq_len=seq_len)
