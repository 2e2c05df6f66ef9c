"""A pre-allocated key/value cache for generation, one pair of buffers per decoder layer.

Buffers are (batch, max_len, local KV heads, head_dim): this rank's KV groups only (GQA-aware,
TP-sharded like the attention). Rows are left-padded prompts: ``key_mask`` (batch, max_len) says
which cached positions hold real tokens, so padding never takes part in attention. The first call
(prefill, an empty cache) runs the training attention kernel with the padding as its own
document; later calls (decode) attend over the cache in plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaevo import kernels


class KVCache:
    """Keys and values of ``num_layers`` layers for ``batch`` rows of up to ``max_len`` positions.

    ``length`` is how many positions are filled (the same for every row); :meth:`layer` gives the
    view one decoder layer writes to, and the model calls :meth:`advance` after each forward.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, *,
                 device=None, dtype=None, key_mask: torch.Tensor | None = None):
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        if key_mask is None:
            key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        if key_mask.shape != (batch, max_len):
            raise ValueError(f"KVCache: key_mask {tuple(key_mask.shape)} must be (batch, max_len) = {(batch, max_len)}")
        self.key_mask = key_mask.to(device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, key_mask: torch.Tensor | None = None) -> "KVCache":
        """A cache shaped for the decoder layers of ``model`` (a LlamaStage), on its device and dtype."""
        attn = model.layers[0].attention if len(model.layers) else None
        weight = next(model.parameters())
        return cls(len(model.layers), batch, max_len, attn.local_kv_heads if attn else 0,
                   model.args.head_dim, device=weight.device, dtype=weight.dtype, key_mask=key_mask)

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch), in that order: drops finished sequences."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.key_mask = self.key_mask.index_select(0, rows)


class LayerCache:
    """One decoder layer's slice of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Store ``k``, ``v`` (batch, s, kv_heads, d) after the filled positions; attention of ``q``
        (batch, s, heads, d) over every cached position up to its own, (batch, s, heads, d)."""
        c = self.cache
        start, s = c.length, q.shape[1]
        if start + s > c.max_len:
            raise ValueError(f"KVCache: {start} cached + {s} new positions exceed its {c.max_len}")
        kc, vc = c.k[self.index], c.v[self.index]
        kc[:, start:start + s] = k
        vc[:, start:start + s] = v
        if start == 0:
            return kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        return cached_attention(q, kc[:, :start + s], vc[:, :start + s], c.key_mask[:, :start + s])


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of the last ``s`` positions ``q`` (b, s, h, d) over keys ``k``/``v``
    (b, T, kv, d), only to keys where ``key_mask`` (b, T) holds; K/V are never repeated per head."""
    b, s, h, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    g = h // kv
    causal = torch.arange(t, device=q.device)[None, :] <= torch.arange(t - s, t, device=q.device)[:, None]  # (s, T)
    mask = key_mask[:, None, None, None, :] & causal[None, None, None]  # (b, 1, 1, s, T)
    mask = mask.expand(b, 1, g, s, t).reshape(b, 1, g * s, t)
    qg = q.view(b, s, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.view(b, kv, g, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, h, d)
