"""The base of megaevo's errors about the user's input.

A :class:`UserError` is a mistake in a config, a file or a command line: the commands print it as
one line (on rank 0 only under torchrun) without a traceback and exit non-zero. Anything else that
goes wrong is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Input that megaevo cannot use; the message names the setting or the file and what to change."""
