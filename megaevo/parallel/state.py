"""Process groups for 3D parallelism, from a device mesh ordered (pp, dp, tp), tp innermost.

A :class:`ParallelState` is passed explicitly to everything that communicates; there is no
module-level "current" state. :meth:`ParallelState.single` is the state of one plain process
(every size 1, every group ``None``) and needs no ``init_process_group``: with it all parallel
layers reduce to their ordinary single-device versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks and groups of one process along each mesh dimension.

    ``tp_group`` / ``dp_group`` / ``pp_group`` are ``None`` when that size is 1 (and always in
    the single-process state), so collectives over them can be skipped cheaply.
    ``embedding_group`` joins the first and the last pipeline stage of this process's (DP, TP)
    coordinates, where tied input and output embeddings sum their gradients; ``None`` without
    pipeline parallelism.
    ``sequence_parallel`` says whether activations between tensor-parallel regions are split
    along the sequence (it has no effect when ``tp_size == 1``).
    """

    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    mesh: Any = None
    sequence_parallel: bool = False
    embedding_group: Any = None

    @classmethod
    def single(cls, sequence_parallel: bool = False) -> "ParallelState":
        """One process, no distributed setup."""
        return cls(sequence_parallel=sequence_parallel)

    @classmethod
    def from_mesh(cls, mesh, sequence_parallel: bool = False, embedding_group: Any = None) -> "ParallelState":
        """The state of this process in a 3D ``mesh`` with dim names ``("pp", "dp", "tp")``."""
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(f"ParallelState: the device mesh must have dims {MESH_DIMS}, got {mesh.mesh_dim_names}")
        sizes = {d: mesh.size(i) for i, d in enumerate(MESH_DIMS)}
        ranks = {d: mesh.get_local_rank(d) for d in MESH_DIMS}
        groups = {d: (mesh.get_group(d) if sizes[d] > 1 else None) for d in MESH_DIMS}
        return cls(tp_size=sizes["tp"], dp_size=sizes["dp"], pp_size=sizes["pp"],
                   tp_rank=ranks["tp"], dp_rank=ranks["dp"], pp_rank=ranks["pp"],
                   tp_group=groups["tp"], dp_group=groups["dp"], pp_group=groups["pp"],
                   mesh=mesh, sequence_parallel=sequence_parallel, embedding_group=embedding_group)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def sequence_parallel_active(self) -> bool:
        """Sequence parallelism is asked for and there is more than one TP rank to split over."""
        return self.sequence_parallel and self.tp_size > 1


def init_parallel_state(tp: int = 1, dp: int | None = None, pp: int = 1, *, device_type: str | None = None,
                        sequence_parallel: bool = False) -> ParallelState:
    """Build the (pp, dp, tp) device mesh over the initialised default process group.

    ``dp`` defaults to ``world_size // (tp * pp)``. Without an initialised process group (and
    with every size 1) this returns :meth:`ParallelState.single`. ``device_type`` defaults to
    ``"cuda"`` when CUDA is available, else ``"cpu"``.
    """
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if tp == pp == 1 and dp in (None, 1):
            return ParallelState.single(sequence_parallel)
        raise ValueError(f"tp={tp}, dp={dp}, pp={pp} needs torch.distributed to be initialised "
                         "(launch with torchrun)")
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp ({tp}) x parallel.pp ({pp})")
    if dp is None:
        dp = world // (tp * pp)
    if tp * dp * pp != world:
        raise ValueError(f"parallel.tp ({tp}) x data parallel ({dp}) x parallel.pp ({pp}) = {tp * dp * pp} "
                         f"must equal the world size {world}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
    return ParallelState.from_mesh(mesh, sequence_parallel=sequence_parallel,
                                   embedding_group=_embedding_group(mesh) if pp > 1 else None)


def _embedding_group(mesh):
    """This process's group of {first stage, last stage} at its (DP, TP) coordinates.

    Every process takes part in creating every such group, as ``new_group`` requires.
    """
    ranks = mesh.mesh  # (pp, dp, tp) global ranks
    mine = None
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            members = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine = group
    return mine
