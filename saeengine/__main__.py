"""``python -m saeengine``: the command line (what ``torchrun ... -m saeengine train ...`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
