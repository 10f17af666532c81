"""`streamsvd` under torchrun with each rank keeping refinement's streams somewhere else
(rank 0 in host memory, the others in the store), as ranks whose memory differs would
under --refine-streams auto: for tests/test_held_streams.py."""

import os
import sys

from streamsvd import cli, plan


def keep_by_rank(cfg, host, device, held, have) -> str:
    return "host" if os.environ["RANK"] == "0" else "store"


plan.refine_keep = keep_by_rank
sys.exit(cli.main())
