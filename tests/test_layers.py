"""The package's layering, as docs/development.md states it: the run does not import the
estimate (issue 43)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ("streamsvd.pipeline", "streamsvd.rundir", "streamsvd.step", "streamsvd.prepare")
ESTIMATE = ("streamsvd.plan", "streamsvd.speed")


def test_the_run_imports_neither_the_plan_nor_the_speed_model():
    """Imported in a fresh interpreter, the run's modules load neither plan.py nor
    speed.py, directly or through another module; the entry (run.py) that hands the run
    its planner does."""
    probe = (f"import importlib, sys\nfor name in {RUN!r}:\n    importlib.import_module(name)\n"
             f"print(sorted(m for m in {ESTIMATE!r} if m in sys.modules))\n"
             "import streamsvd.run\n"
             f"print(sorted(m for m in {ESTIMATE!r} if m in sys.modules))")  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_alone, with_entry = result.stdout.strip().splitlines()[-2:]
    assert run_alone == "[]"
    assert with_entry == str(sorted(ESTIMATE))
