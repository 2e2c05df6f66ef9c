"""Stopping a run cleanly: signals turned into a request to save and stop at the end of the step, and the
request that every rank of a job agrees on."""
from __future__ import annotations

import os
import signal
import threading

from megaevo.log import get_logger

log = get_logger(__name__)


class StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to save and stop at the end of the current step
    (when ``active``; ``saving``: checkpoint.save). The first signal is acknowledged at once with one
    line. Later ones never interrupt: the run still commits its checkpoint (a background save
    included) and stops, and each says so; only SIGKILL ends it sooner, which leaves the checkpoints
    already committed as they are. Rank 0 speaks at WARNING, the other ranks at INFO. Handlers are
    only installed in the main thread, and the previous ones come back on exit."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, active: bool, saving: bool = True, rank: int = 0):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.saving, self.rank = saving, rank
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "nothing"

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self._say(f"{name} received: saving a checkpoint at the end of this step, then stopping (a second "
                      f"Ctrl-C waits for the save)" if self.saving else
                      f"{name} received: stopping at the end of this step (checkpoint.save is off: nothing is saved)")
        else:
            self._say(f"{name} received: already stopping; waiting for the checkpoint to be committed (kill -9 "
                      f"{os.getpid()} ends the run now, without it)" if self.saving else
                      f"{name} received: already stopping at the end of this step")

    def _say(self, message: str) -> None:
        (log.warning if self.rank == 0 else log.info)(message)

    def __enter__(self) -> "StopSignals":
        if self.active:
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """Whether the run stops at the next step boundary. ``signals`` is set while a run listens for them;
    :meth:`local` is this rank's request, which the train units add to their global-count all-reduce
    and :meth:`agree` records the job's sum of, so that every rank stops at the same step."""

    def __init__(self):
        self.signals: StopSignals | None = None
        self.requested = False  # a rank received a stop signal (agreed on by every rank)

    def local(self) -> bool:
        return self.signals is not None and self.signals.received is not None

    def agree(self, any_rank: bool) -> None:
        self.requested = self.requested or any_rank
