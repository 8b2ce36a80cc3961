"""`python -m spotwise`: the same as the `spotwise` command."""

from __future__ import annotations

import sys

from spotwise.cli import main

if __name__ == "__main__":
    sys.exit(main())
