"""The base of megaevo's errors about the user's input.

A :class:`UserError` is a mistake in a config, a file or a command line: the commands print it as
one line (on rank 0 only under torchrun) without a traceback and exit non-zero. Anything else that
goes wrong is a bug and keeps its traceback. :func:`user_error_message` says which errors are the
user's (also an OSError about a given path, a missing optional package), and :func:`report_user_error`
is how every command reports one.
"""
import os

from megaevo.log import configured, get_logger, setup_logging


class UserError(ValueError):
    """Input that megaevo cannot use; the message names the setting or the file and what to change."""


class ConvertError(UserError):
    """Input that cannot be converted or read: unsupported, inconsistent, not the file format it claims
    to be, or in the way of the output."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite steps or state, rollouts off the policy); the message says where
    to continue from. `megaevo train` prints it as one line and exits with 3."""


OPTIONAL_PACKAGES = {
    "tokenizers": "pip install 'megaevo[hf]'",
    "reasoning_gym": "pip install 'megaevo[demo]'",
    "math_verify": "pip install 'megaevo[eval]'",
    "transformers": "pip install transformers",
    "triton": "pip install triton",
    "apex": "see https://github.com/NVIDIA/apex",
    "pyarrow": "pip install 'megaevo[parquet]'",
    "zstandard": "pip install 'megaevo[zstd]'",
}

# OSErrors about a path the user gave (a missing input, an existing output, no permission).
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error in the user's input, or None for anything else (a bug,
    which keeps its traceback): a UserError, an OSError about a given path, a missing optional package."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, PATH_ERRORS):
        if e.filename is not None and e.strerror:
            both = f" -> {e.filename2}" if e.filename2 is not None else ""
            return f"{e.filename}{both}: {e.strerror}"
        return str(e)
    if isinstance(e, ImportError):
        if "pip install" in str(e):  # megaevo's own message for an optional package
            return str(e)
        top = (e.name or "").split(".")[0]
        if isinstance(e, ModuleNotFoundError) and top in OPTIONAL_PACKAGES:
            return f"this needs the optional package {top!r}, which is not installed: {OPTIONAL_PACKAGES[top]}"
    return None


def report_user_error(e: BaseException, command: str) -> int:
    """Log a mistake in the user's input as one line on stderr (`error: megaevo COMMAND: ...`) and return
    exit code 2; re-raise anything else (a bug keeps its traceback, as every error does with
    MEGAEVO_DEBUG=1)."""
    message = user_error_message(e)
    if message is None or os.environ.get("MEGAEVO_DEBUG"):
        raise e
    if not configured():
        setup_logging(rank=int(os.environ.get("RANK", "0") or 0))
    get_logger("megaevo").error("megaevo %s: %s", command, message)  # `error: megaevo COMMAND: ...` on stderr
    return 2
