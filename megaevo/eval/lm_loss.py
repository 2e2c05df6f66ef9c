"""Language-modelling loss on an indexed dataset (``name.bin`` + ``name.idx``).

Each document (of the first ``limit``) is cut on its own into consecutive windows of ``seq_len + 1``
tokens that overlap by one token, like GPT training samples: window ``k`` of a document feeds its tokens
``[k*seq_len, (k+1)*seq_len)`` and predicts each next token, so every token of a document but its first
is predicted exactly once, from context within that document (no window spans two documents), and a
document's last window may be shorter. ``loss`` is the mean next-token negative log-likelihood over all
predicted tokens, ``ppl = exp(loss)``, ``tokens`` their count.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaevo.common import IGNORE_INDEX
from megaevo.data.indexed import IndexedDataset
from megaevo.errors import UserError

from .multiple_choice import _device, _progress


@dataclass
class LossTask:
    """The documents of an indexed dataset prefix; :meth:`run` measures a model's loss on them."""

    name: str
    documents: list[np.ndarray]
    seq_len: int | None = None
    encodes_text = False  # scores token ids: needs no tokenizer

    def windows(self, seq_len: int) -> list[tuple[int, np.ndarray]]:
        """``(document, window)`` pairs: each document's consecutive windows of ``seq_len + 1`` tokens
        overlapping by one (its last may be shorter; a document of one token has none)."""
        return [(d, doc[s:s + seq_len + 1]) for d, doc in enumerate(self.documents)
                for s in range(0, max(len(doc) - 1, 0), seq_len)]

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
            width = max(len(w) for _, w in batch) - 1
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for r, (_, w) in enumerate(batch):
                w = torch.from_numpy(w.astype(np.int64))
                tokens[r, :len(w) - 1] = w[:-1]
                labels[r, :len(w) - 1] = w[1:]
            tokens, labels = tokens.to(device), labels.to(device)
            with torch.no_grad():
                lp = model.logprobs(tokens, labels).double() * (labels != IGNORE_INDEX)
            for r, (doc, w) in enumerate(batch):
                nll, n = -float(lp[r].sum()), len(w) - 1
                total += nll
                count += n
                samples.append({"index": b_idx * batch_size + r, "document": doc, "tokens": n, "loss": nll / n})
        loss = total / count if count else math.nan
        metrics = {"n": len(windows), "loss": loss, "ppl": math.exp(loss) if count else math.nan, "tokens": count}
        return {"metrics": metrics, "samples": samples}


def load_task(prefix: str | os.PathLike, limit: int | None = None, seq_len: int | None = None) -> LossTask:
    """The first ``limit`` documents (all by default) of the indexed dataset at ``prefix``."""
    if seq_len is not None and seq_len < 1:
        raise UserError(f"loss task {prefix}: seq_len must be at least 1, got {seq_len}")
    data = IndexedDataset(prefix)
    docs = data.num_documents if limit is None else min(limit, data.num_documents)
    bounds = [int(b) for b in data.document_indices[:docs + 1]]
    documents = []
    for first, last in zip(bounds, bounds[1:]):
        parts = [data.get(i) for i in range(first, last)]
        documents.append(np.concatenate(parts) if parts else np.zeros(0, data.dtype))
    if not any(len(doc) >= 2 for doc in documents):
        raise UserError(f"{data.idx_path}: needs a document of at least two tokens to measure a loss, "
                        f"the longest of {docs} has {max(map(len, documents), default=0)}")
    return LossTask(name=Path(data.prefix).name, documents=documents, seq_len=seq_len)
