"""Logging for megaevo: the standard `logging` module under the `megaevo` namespace.

Every module gets its logger with `get_logger(__name__)`; progress and notices go out at INFO,
problems at WARNING (so they can be filtered with a level or a `logging.Filter` like any other
log record). A command's result (a table, JSON) is program output and is printed to stdout, not
logged.

`setup_logging` installs one handler on the `megaevo` logger. Progress and notices (INFO and
below) go to stdout, where a training run's step lines have always gone; warnings and errors go
to stderr, prefixed with their level (`warning: ...`). By default only rank 0 speaks at INFO;
the other ranks report warnings and errors only, each prefixed with `[rank N]`. With
`all_ranks` (or the environment variable `MEGAEVO_LOG_ALL_RANKS=1`) every rank logs and every
line carries its rank. `MEGAEVO_LOG_LEVEL` (a name such as `DEBUG` or a number) overrides the
level.

Without `setup_logging` (megaevo used as a library) nothing is installed: records propagate to
the root logger and the application's own configuration decides what is shown.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "megaevo"
ENV_ALL_RANKS = "MEGAEVO_LOG_ALL_RANKS"
ENV_LEVEL = "MEGAEVO_LOG_LEVEL"


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `name` under the `megaevo` namespace (`megaevo.data.x` stays as it is,
    `x` becomes `megaevo.x`, None gives the `megaevo` logger itself)."""
    if not name or name == ROOT:
        return logging.getLogger(ROOT)
    if name.startswith(ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT}.{name}")


class _Formatter(logging.Formatter):
    """The message alone for INFO and below; `warning: ` (the level) before worse ones;
    `[rank N] ` in front when the handler says so."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.prefix:
            text = "\n".join(self.prefix + line for line in text.split("\n"))
        return text


class _Handler(logging.StreamHandler):
    """INFO and below to stdout, WARNING and above to stderr: whatever sys.stdout and sys.stderr
    are at the time of the call, so that redirection and test capture see the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(_Formatter())
        self._level = logging.INFO

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr if self._level >= logging.WARNING else sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it once; the live streams win
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self._level = record.levelno  # emit runs under the handler's lock
        super().emit(record)


def _parse_level(value: str, what: str) -> int:
    value = value.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ValueError(f"{what}={value!r}: not a logging level (use DEBUG, INFO, WARNING, ERROR or a number)")
    return level


def _env_flag(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def setup_logging(rank: int = 0, all_ranks: bool = False, level: int | str = logging.INFO) -> logging.Logger:
    """Configure the `megaevo` logger for this process and return it.

    One handler: INFO and below on stdout, WARNING and above on stderr. Rank 0 logs at `level`;
    other ranks log WARNING and worse only, prefixed `[rank N]`, unless `all_ranks` is true, in
    which case every rank logs at `level` and every line is prefixed with its rank. The environment variables MEGAEVO_LOG_ALL_RANKS
    and MEGAEVO_LOG_LEVEL, when set, take precedence over the arguments. Calling it again
    reconfigures the same handler (no duplicate lines).
    """
    if os.environ.get(ENV_ALL_RANKS) is not None:
        all_ranks = _env_flag(os.environ[ENV_ALL_RANKS])
    if os.environ.get(ENV_LEVEL):
        level = _parse_level(os.environ[ENV_LEVEL], ENV_LEVEL)
    elif isinstance(level, str):
        level = _parse_level(level, "level")

    logger = logging.getLogger(ROOT)
    handler = next((h for h in logger.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # our handler shows it; the root logger's would show it twice
    quiet = rank != 0 and not all_ranks
    handler.setLevel(max(level, logging.WARNING) if quiet else level)
    if isinstance(handler.formatter, _Formatter):
        handler.formatter.prefix = f"[rank {rank}] " if (all_ranks or rank != 0) else ""
    return logger


def configured() -> bool:
    """Whether `setup_logging` has installed its handler in this process."""
    return any(isinstance(h, _Handler) for h in logging.getLogger(ROOT).handlers)


def reset_logging() -> None:
    """Undo `setup_logging`: remove its handler and let records propagate again."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
