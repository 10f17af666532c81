"""Shim so `python cli.py ...` works from a checkout; the installed entry is `streamsvd`."""

import sys

from streamsvd.cli import main

if __name__ == "__main__":
    sys.exit(main())
