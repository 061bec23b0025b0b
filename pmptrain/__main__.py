"""``python -m pmptrain`` and ``torchrun -m pmptrain``: the ``pmptrain`` command line."""

import sys

from .bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
