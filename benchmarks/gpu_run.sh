#!/usr/bin/env bash
# benchmarks/gpu_check.py on a lent GPU machine, prepared so that its minutes go to the check.
#
# The machine's image has torch, transformers, accelerate, safetensors, psutil and tqdm, not
# zarr and what zarr needs; nothing can be downloaded there. So, here, once:
#     bash benchmarks/gpu_run.sh --fetch      # the wheels into .whl/ (git ignores it)
# then through the device tool, from the repository root, with carry [".whl"]:
#     bash benchmarks/gpu_run.sh                                   # timeout_s 540: 7b, 70b
#     bash benchmarks/gpu_run.sh --steps 7b-bf16 factorise --budget 200 --name gpu_check_more
# (any gpu_check.py options; the second, on the still-warm machine, if time is left), and
# copy what comes back from $OUT into benchmarks/results/. The image's transformers (5.17
# when last read) is used as it is: `gpu_check.py --dry` passes with it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}  # the device's Python (KINDS.md); another to try this script here
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0"

if [ "${1:-}" = "--fetch" ]; then
    rm -rf .whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
    ls .whl
    exit
fi

: "${OUT:?gpu_run.sh runs on the device machine, where OUT is set; --fetch prepares it here}"
ls .whl/*.whl > /dev/null || { echo "gpu_run.sh: no .whl/: run --fetch here, carry .whl" >&2; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" || true
"$PYTHON" -c "import torch, transformers, zarr; print('torch', torch.__version__, 'transformers',
    transformers.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"
exec "$PYTHON" benchmarks/gpu_check.py --results "$OUT" "$@"
