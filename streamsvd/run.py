"""`compress`: a run (pipeline.py) with its plan (plan.py). The run does not import the
estimate; this entry hands it the planner, which it calls once, before its first block."""

from __future__ import annotations

from .pipeline import Compressor
from .plan import plan_started_run
from .world import World


def compress(cfg, world: World | None = None) -> dict:
    """Compress cfg.model into cfg.out (cfg: a CompressConfig); returns the run's summary
    (a distributed run's on rank 0, each other rank's own part of it on that rank)."""
    return Compressor(cfg, world, planner=plan_started_run).run()
