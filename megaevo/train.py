"""`python -m megaevo.train --config FILE [key=value ...]`, the entry point for torchrun: `megaevo train`."""
from __future__ import annotations

import sys

from megaevo.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """`megaevo train` with ``argv`` (default: this process's arguments)."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
