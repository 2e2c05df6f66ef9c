"""How a local (TP-sharded) parameter maps onto its logical, unsharded tensor.

Every parameter built by :mod:`megaevo.parallel.layers` carries a :class:`ParamLayout` as
``param.tp_layout``. The layout is what a checkpoint needs to be independent of the TP size:

* ``partition_dim``: the dim split over TP ranks, or ``None`` if the parameter is replicated.
* ``chunks``: for fused weights, the logical sizes of the pieces laid end to end along
  ``partition_dim`` (e.g. ``(ffn, ffn)`` for gate and up). Each piece is split over the ranks
  separately, and a rank holds its slice of every piece, in order.
* ``logical_size`` / ``padded_size``: for padded weights (vocabulary rows padded to a multiple
  of 128 x TP), the real and the padded size along ``partition_dim``; the padding rows at the
  end belong to no logical tensor, so the logical tensor does not depend on the TP size.

:meth:`ParamLayout.fragments` lists, for one rank, which contiguous block of the logical tensor
each part of the local tensor holds; saving those blocks with their offsets and loading each
new rank's blocks is enough to reshard between any TP sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fragment:
    """A contiguous block ``local[local_slice]`` that sits at ``logical_offset`` in the logical tensor."""

    local_start: int          # start along the partition dim in the local tensor
    logical_offset: tuple[int, ...]
    shape: tuple[int, ...]
    dim: int | None

    def local_view(self, local: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return local
        return local.narrow(self.dim, self.local_start, self.shape[self.dim])


@dataclass(frozen=True)
class ParamLayout:
    """Placement of a parameter in its logical tensor; see the module docstring."""

    partition_dim: int | None = None
    chunks: tuple[int, ...] | None = None
    logical_size: int | None = None
    padded_size: int | None = None

    def __post_init__(self):
        if self.partition_dim is None and (self.chunks or self.logical_size is not None):
            raise ValueError("ParamLayout: chunks and logical_size need a partition_dim")
        if self.chunks and self.logical_size is not None:
            raise ValueError("ParamLayout: a weight may be chunked or padded, not both")
        if (self.logical_size is None) != (self.padded_size is None):
            raise ValueError("ParamLayout: logical_size and padded_size go together")

    @property
    def replicated(self) -> bool:
        return self.partition_dim is None

    def _pieces(self, padded_size: int) -> tuple[int, ...]:
        return tuple(self.chunks) if self.chunks else (padded_size,)

    def logical_shape(self, local_shape, tp_size: int) -> tuple[int, ...]:
        """The unsharded, unpadded shape for a local tensor of ``local_shape`` on ``tp_size`` ranks."""
        shape = list(local_shape)
        if self.partition_dim is not None:
            shape[self.partition_dim] = self.logical_size or local_shape[self.partition_dim] * tp_size
        return tuple(shape)

    def fragments(self, local_shape, tp_rank: int, tp_size: int) -> list[Fragment]:
        """The blocks of the logical tensor held by rank ``tp_rank``; padding rows are left out."""
        local_shape = tuple(local_shape)
        if self.partition_dim is None:
            return [Fragment(0, (0,) * len(local_shape), local_shape, None)]
        d = self.partition_dim
        padded = local_shape[d] * tp_size
        frags, local_start, logical_start = [], 0, 0
        for piece in self._pieces(padded):
            per_rank = piece // tp_size
            start = logical_start + tp_rank * per_rank
            real = per_rank
            if self.logical_size is not None:
                real = max(0, min(per_rank, self.logical_size - start))
            if real > 0:
                offset = tuple(start if i == d else 0 for i in range(len(local_shape)))
                shape = tuple(real if i == d else s for i, s in enumerate(local_shape))
                frags.append(Fragment(local_start, offset, shape, d))
            local_start += per_rank
            logical_start += piece
        return frags

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's local tensor cut from the logical tensor ``full`` (padding rows zero)."""
        if self.partition_dim is None:
            return full.clone()
        d = self.partition_dim
        size = full.shape[d]
        if self.logical_size is not None:
            if size != self.logical_size:
                raise ValueError(f"shard: logical size {self.logical_size} along dim {d}, tensor has {size}")
            size = self.padded_size
            pad = list(full.shape)
            pad[d] = size - full.shape[d]
            full = torch.cat([full, full.new_zeros(pad)], dim=d)
        pieces = self._pieces(size)
        if sum(pieces) != size or any(p % tp_size for p in pieces):
            raise ValueError(f"shard: dim {d} of size {size} (pieces {pieces}) does not split over {tp_size} ranks")
        parts = [piece.chunk(tp_size, dim=d)[tp_rank] for piece in full.split(list(pieces), dim=d)]
        return torch.cat(parts, dim=d).contiguous()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The logical tensor from the local tensors of every rank, in TP-rank order."""
        if self.partition_dim is None:
            return shards[0].clone()
        d, n = self.partition_dim, len(shards)
        local_size = shards[0].shape[d]
        pieces = self._pieces(local_size * n)
        per_rank = [p // n for p in pieces]
        split = [s.split(per_rank, dim=d) for s in shards]
        full = torch.cat([torch.cat([split[r][i] for r in range(n)], dim=d) for i in range(len(pieces))], dim=d)
        if self.logical_size is not None:
            full = full.narrow(d, 0, self.logical_size)
        return full.contiguous()


@dataclass(frozen=True)
class ParamMeta:
    """What a checkpoint, the optimizer and gradient reduction need to know about one local parameter.

    ``name`` is the logical, layer-global name (``layers.7.attention.qkv.weight``);
    ``logical_shape`` the unsharded, unpadded shape. ``pipeline_tied`` marks a copy of a
    parameter that lives on another pipeline stage too (the output embedding tied to the input
    embedding): both copies have the same name, start equal, and need their gradients summed.
    """

    name: str
    logical_shape: tuple[int, ...]
    layout: ParamLayout
    tp_rank: int = 0
    tp_size: int = 1
    weight_decay: bool = True
    sequence_parallel: bool = False
    pipeline_tied: bool = False

    @property
    def partition_dim(self) -> int | None:
        return self.layout.partition_dim

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return self.layout.chunks

    @property
    def tp_replicated(self) -> bool:
        """Every TP rank holds the whole tensor (norm weights, row-parallel biases)."""
        return self.layout.replicated

    def fragments(self, local_shape) -> list[Fragment]:
        """The blocks of the logical tensor this rank holds (see :meth:`ParamLayout.fragments`)."""
        return self.layout.fragments(local_shape, self.tp_rank, self.tp_size)

    def to_dict(self) -> dict:
        """A JSON-ready description (no tensors)."""
        return {"name": self.name, "logical_shape": list(self.logical_shape),
                "partition_dim": self.layout.partition_dim,
                "chunks": list(self.layout.chunks) if self.layout.chunks else None,
                "padded_size": self.layout.padded_size, "tp_rank": self.tp_rank, "tp_size": self.tp_size,
                "weight_decay": self.weight_decay, "sequence_parallel": self.sequence_parallel,
                "pipeline_tied": self.pipeline_tied}


def param_meta(name: str, param: torch.Tensor, tp_rank: int = 0, tp_size: int = 1,
               pipeline_tied: bool = False) -> ParamMeta:
    """The :class:`ParamMeta` of a parameter tagged by :func:`megaevo.parallel.layers.tag_param`
    (untagged parameters count as replicated, with weight decay)."""
    layout = getattr(param, "tp_layout", ParamLayout())
    return ParamMeta(name=name, logical_shape=layout.logical_shape(param.shape, tp_size), layout=layout,
                     tp_rank=tp_rank, tp_size=tp_size, weight_decay=getattr(param, "weight_decay", True),
                     sequence_parallel=getattr(param, "sequence_parallel", False),
                     pipeline_tied=pipeline_tied or getattr(param, "pipeline_tied", False))
