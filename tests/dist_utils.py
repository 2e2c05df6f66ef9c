"""Run a function on N gloo processes (CPU) and get each rank's return value back.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group over a ``file://`` store in a temporary directory, calls ``fn(rank, world_size,
*args)`` in each and returns the list of results in rank order. ``fn`` must be a module-level
function; its results travel back through torch.save / torch.load(weights_only=True), so they may
hold tensors, numbers, strings, lists, tuples and dicts. An exception on any rank is raised in the
parent as ``DistributedTestError`` carrying that rank's traceback.

Start few process groups: share one spawn across many checks (``run_checks`` runs a dict of
named checks in one spawn and records each one's failure instead of stopping at the first).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable


class DistributedTestError(RuntimeError):
    """A rank of a spawned test raised; the message holds its traceback."""


def _worker(fn, rank, world_size, init_file, out_dir, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", traceback.format_exc())
    torch.save(result, path + ".tmp")  # tensors, numbers, strings and containers only
    os.replace(path + ".tmp", path)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each run in its own gloo process."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="megaevo-dist-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, tmp, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                reason = "timed out" if r in hung else f"exited with code {procs[r].exitcode} without a result"
                errors.append(f"rank {r} {reason}")
                results.append(None)
                continue
            import torch

            status, value = torch.load(path, weights_only=True)
            if status == "error":
                errors.append(f"rank {r} raised:\n{value}")
            results.append(value)
        if errors:
            raise DistributedTestError("\n".join(errors))
        return results


def run_checks(rank: int, world_size: int, checks: dict[str, Callable[[int, int], Any]]) -> dict[str, str | None]:
    """Run named checks in order on this rank; ``{name: None or the failure's traceback}``.

    Meant to be called inside a spawned function so that one spawn serves many checks. A check
    that fails after its collectives leaves the others runnable; one that fails halfway through a
    collective can hang the group (the spawn's timeout catches that).
    """
    outcome = {}
    for name, check in checks.items():
        try:
            check(rank, world_size)
            outcome[name] = None
        except Exception:  # noqa: BLE001
            outcome[name] = traceback.format_exc()
    return outcome


def assert_check_passed(results: list[dict[str, str | None]], name: str) -> None:
    """Fail with every rank's traceback if check `name` failed anywhere (results of `run_checks`)."""
    failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name] is not None]
    assert not failures, "\n".join(failures)
