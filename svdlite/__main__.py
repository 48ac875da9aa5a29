"""`python -m svdlite ...`: the same as the `svdlite` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
