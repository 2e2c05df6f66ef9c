"""What the demo's steps share: how they report (progress logged, results printed) and a file's digest."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from megaevo.log import configured, get_logger, setup_logging

logger = get_logger(__name__)


def sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reporters(verbose: bool) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(log, show): progress and notices go to the `megaevo.demo` logger, results (the tables of
    what was made and of the losses) are printed; both are silent when not verbose."""
    if not verbose:
        def quiet(text: str) -> None:
            pass

        return quiet, quiet
    if not configured():
        setup_logging()
    return logger.info, print
