"""``python -m duollm``: the same command line as ``duollm``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
