"""`python -m svdlite ...`, the same as the `svdlite` command (and what torchrun runs: `torchrun ... -m svdlite`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
