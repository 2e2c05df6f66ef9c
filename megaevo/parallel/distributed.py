"""Joining the job and speaking once for it: :func:`init_distributed` (the process group from torchrun's
environment, also after an elastic restart) and :func:`report_once` (a fatal line logged once per job)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megaevo.log import get_logger

log = get_logger(__name__)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        _init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _init_process_group(backend: str) -> None:
    """init_process_group from torchrun's environment. After an elastic restart
    (TORCHELASTIC_RESTART_COUNT > 0) the new workers share the agent's store with the keys the failed
    attempt left there (peer addresses that no longer listen), so each attempt gets a prefix of its own."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        dist.init_process_group(backend)
        return
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"megaevo/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def report_once(message: str, rank: int) -> None:
    """Log a fatal one-line ``message`` once for the whole job: from rank 0, or from another rank
    whose message rank 0 did not also report (errors that only some ranks hit)."""
    store = None
    if dist.is_initialized():
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):
            store = None
    if rank == 0:
        log.error(message)
        if store is not None:  # after logging: the other ranks wait for it, so torchrun, which ends the
            store.set("megaevo/error", message)  # job when the first rank exits, cannot cut the line off
        return
    seen = None
    if store is not None:
        try:
            store.wait(["megaevo/error"], datetime.timedelta(seconds=3))
            seen = store.get("megaevo/error").decode()
        except RuntimeError:  # rank 0 reported nothing in time (DistStoreError is a RuntimeError)
            seen = None
    if seen is None or not seen.startswith(message):  # rank 0's may say more (e.g. where to resume from)
        log.error(message)
