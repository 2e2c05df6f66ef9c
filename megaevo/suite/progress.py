"""Progress of a suite's child process, shown while it runs (its full output goes to its log).

:class:`Progress` reads what the child writes to its log and echoes its step lines (``step 40/300  loss
...  tok/s``, as megaevo.train prints them): the first one, then at most one every ``every`` seconds, and
the last step always. When nothing was echoed for ``quiet`` seconds (an evaluation, a long data step) it
echoes one line saying the child still runs and for how long. The launcher feeds it the log's new text
(:meth:`Progress.feed`) and calls :meth:`Progress.tick` while it waits for the child.
"""
from __future__ import annotations

import codecs
import re
import time
from dataclasses import dataclass, field
from typing import Callable

EVERY_S = 10.0   # the shortest time between two step lines echoed
QUIET_S = 30.0   # silence after which a line says the child still runs
POLL_S = 1.0     # how often the launcher reads the log
INDENT = " " * 8  # under the launcher's `TRAIN   ` / `EVAL    ` line
STEP_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?step\s+(?P<step>\d+)/(?P<total>\d+)\b")


def elapsed(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class Progress:
    echo: Callable[[str], None]
    every: float = EVERY_S
    quiet: float = QUIET_S
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)
    last: float = field(init=False)          # when a line was last echoed
    step: str | None = field(default=None, init=False)   # the last step line seen
    _seen_step: bool = field(default=False, init=False)
    _partial: str = field(default="", init=False)
    _decoder: codecs.IncrementalDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.last = self.clock()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed_bytes(self, data: bytes, final: bool = False) -> None:
        self.feed(self._decoder.decode(data, final))

    def feed(self, text: str) -> None:
        """Take the child's new output; echo the step lines due."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        now = self.clock()
        for line in lines:
            line = line.rsplit("\r", 1)[-1].strip()  # a progress bar's last state
            m = STEP_LINE.match(line)
            if m is None:
                continue
            self.step = line
            if not self._seen_step or m["step"] == m["total"] or now - self.last >= self.every:
                self._say(line, now)
            self._seen_step = True

    def tick(self) -> None:
        """Echo that the child still runs when nothing was echoed for `quiet` seconds."""
        now = self.clock()
        if now - self.last >= self.quiet:
            self._say(f"... running for {elapsed(now - self.start)}", now)

    def _say(self, text: str, now: float) -> None:
        self.echo(INDENT + text)
        self.last = now
