"""`python -m streamsvd ...`: what torchrun and accelerate launch run (`-m streamsvd`)."""

import sys

from .cli import main

sys.exit(main())
