"""A pre-allocated key/value cache for generation, one pair of buffers per decoder layer.

Buffers are (batch, local KV heads, max_len, head_dim): this rank's KV groups only (GQA-aware,
TP-sharded like the attention). Rows are left-padded prompts: ``key_mask`` (batch, max_len) says
which cached positions hold real tokens, so padding never takes part in attention. The first call
(prefill, an empty cache) runs the training attention kernel with the padding as its own
document; later calls (decode) attend over the filled part of the cache with torch's SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaevo import kernels


class KVCache:
    """Keys and values of ``num_layers`` layers for ``batch`` rows of up to ``max_len`` positions.

    ``length`` is how many positions are filled (the same for every row); :meth:`layer` gives the
    view one decoder layer writes to, and the model calls :meth:`advance` after each forward.
    Buffers are stored (batch, kv_heads, max_len, head_dim) so each head's filled keys are one
    contiguous block for the decode attention.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, *,
                 device=None, dtype=None, key_mask: torch.Tensor | None = None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        if key_mask is None:
            key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        if key_mask.shape != (batch, max_len):
            raise ValueError(f"KVCache: key_mask {tuple(key_mask.shape)} must be (batch, max_len) = {(batch, max_len)}")
        self.key_mask = key_mask.to(device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0
        self._layers = [LayerCache(self, i) for i in range(num_layers)]
        self._mask_changed()
        self._rope = None

    @classmethod
    def for_model(cls, chunk, batch: int, max_len: int, key_mask: torch.Tensor | None = None) -> "KVCache":
        """A cache shaped for the decoder layers of ``chunk`` (a LlamaStage), on its device and dtype."""
        attn = chunk.layers[0].attention if len(chunk.layers) else None
        weight = next(chunk.parameters())
        return cls(len(chunk.layers), batch, max_len, attn.local_kv_heads if attn else 0,
                   chunk.args.head_dim, device=weight.device, dtype=weight.dtype, key_mask=key_mask)

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def layer(self, index: int) -> "LayerCache":
        return self._layers[index]

    def begin(self, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, seq: int) -> None:
        """Called by the model before a forward of ``seq`` positions: the rotary factors of those
        positions, gathered once for all layers, (batch or 1, seq, 1, 1, head_dim / 2) float32."""
        if position_ids is None:
            c, s = cos[:seq][None], sin[:seq][None]
        else:
            c, s = cos[position_ids], sin[position_ids]
        self._rope = (c.float()[:, :, None, None, :], s.float()[:, :, None, None, :])

    def advance(self, n: int) -> None:
        self.length += n
        self._rope = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch), in that order: drops finished sequences."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.key_mask = self.key_mask.index_select(0, rows)
        self._mask_changed()

    def _mask_changed(self) -> None:
        self._all_real = bool(self.key_mask.all())
        self._decode_mask = self.key_mask[:, None, None, :]  # (b, 1, 1, max_len) for one new position

    def rotate(self, qk: torch.Tensor) -> torch.Tensor:
        """RoPE of the query and key heads of a fused projection, ``qk`` (batch, seq, kv, g + 1, d),
        by the positions given to :meth:`begin`; the arithmetic of the reference kernel (float32)."""
        c, s = self._rope
        x1, x2 = qk.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(qk.dtype)


class LayerCache:
    """One decoder layer's slice of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def rotate(self, qk: torch.Tensor) -> torch.Tensor:
        return self.cache.rotate(qk)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Store ``k``, ``v`` (batch, s, kv_heads, d) after the filled positions; attention of ``q``
        (batch, s, heads, d) over every cached position up to its own, (batch, s, heads, d)."""
        c = self.cache
        start, s = c.length, q.shape[1]
        if start + s > c.max_len:
            raise ValueError(f"KVCache: {start} cached + {s} new positions exceed its {c.max_len}")
        kc, vc = c.k[self.index], c.v[self.index]
        kc[:, :, start:start + s].copy_(k.transpose(1, 2))
        vc[:, :, start:start + s].copy_(v.transpose(1, 2))
        if start == 0:
            return kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        t = start + s
        if s == 1:
            return decode_attention(q, kc[:, :, :t], vc[:, :, :t], None if c._all_real else c._decode_mask[..., :t])
        return cached_attention(q, kc[:, :, :t].transpose(1, 2), vc[:, :, :t].transpose(1, 2),
                                c.key_mask[:, :t])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One new position: ``q`` (b, 1, h, d) over cached ``k``/``v`` (b, kv, T, d); ``mask`` (b, 1, 1, T)
    or None (every key real). The query heads of a group attend as rows of one (g, d) block, so
    K/V are never repeated per head. Returns (b, 1, h, d)."""
    b, _, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.view(b, 1, h, d)


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
