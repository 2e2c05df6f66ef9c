"""`python -m megaevo.train --config FILE [key=value ...]`, the entry point for torchrun."""
import sys

from megaevo.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
