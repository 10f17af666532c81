"""`python -m streamsvd ...`: what torchrun and accelerate launch run (`-m streamsvd`)."""

import sys

from .errors import EXIT_INTERRUPTED

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C in the seconds torch and transformers take to import
    print("streamsvd: interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)

sys.exit(main())
