"""The naive way, the baseline of benchmarks/memory.py: load the whole model with
transformers, compress it in memory block by block with the same methods (calibration
activations of all windows held in memory), save it with save_pretrained.

    .venv/bin/python benchmarks/naive.py --model CKPT --out DIR --method svd --ratio 0.2 \
        --summary-json naive.json

Prints nothing; the summary JSON has wall seconds per stage and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.calib import calibration_windows, load_text, tokenize  # noqa: E402
from streamsvd.checkpoint import CheckpointReader  # noqa: E402
from streamsvd.factorize import METHODS, rank_for  # noqa: E402
from streamsvd.memory import return_freed_memory  # noqa: E402
from streamsvd.model import (  # noqa: E402
    capture_inputs,
    catch_block_inputs,
    find_blocks,
    linear_layers,
    run_block,
    shared_input_groups,
)
from streamsvd.modeling import LowRankLinear, replace_module  # noqa: E402
from streamsvd.report import StageTimer  # noqa: E402
from streamsvd.stats import InputStats  # noqa: E402


@torch.inference_mode()
def compress_in_memory(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timer, start = StageTimer(cuda=args.device == "cuda"), time.perf_counter()
    method = METHODS[args.method]
    with timer("load"):
        dtype = CheckpointReader(args.model).dtype()
        # transformers maps the shards: weights become resident as they are first used
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        model.to(args.device)
    _, blocks = find_blocks(model)
    orig = comp = []
    kwargs = {}
    if method.needs:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = tokenize(tokenizer, load_text(args.calib)[0])
        windows = calibration_windows(ids, args.nsamples, args.seqlen, args.seed)
        with timer("forward"):
            for s in range(0, args.nsamples, args.batch_size):
                batch = windows[s : s + args.batch_size].to(args.device)
                hidden, kwargs = catch_block_inputs(model, blocks[0], batch)
                orig.append(hidden)
            comp = [h.clone() for h in orig]
    for block in blocks:
        linears = linear_layers(block)
        stats: dict[str, InputStats] = {}
        if method.needs:
            for k, (x, xc) in enumerate(zip(orig, comp, strict=True)):
                with timer("forward"):
                    with capture_inputs(block, list(linears)) as seen:
                        orig[k] = run_block(block, x, kwargs)
                    with capture_inputs(block, list(linears)) as seen_c:
                        run_block(block, xc, kwargs)
                with timer("stats"):
                    if not stats:
                        for group in shared_input_groups(seen):
                            n = seen[group[0]].shape[-1]
                            shared = InputStats(n, method.needs, args.device)
                            stats.update({name: shared for name in group})
                    for s in {id(s): s for s in stats.values()}.values():
                        name = next(n for n, t in stats.items() if t is s)
                        s.add(seen[name], seen_c[name])
        with timer("convert"):
            for name, linear in linears.items():
                m, n = linear.weight.shape
                rank = rank_for(m, n, args.ratio)
                A, B = method.factorize(linear.weight.double(), stats.get(name), rank, timer)
                replace_module(block, name, LowRankLinear.from_factors(A, B, linear.bias, dtype))
        if method.needs & {"comp", "cross"}:
            with timer("forward"):
                comp = [run_block(block, xc, kwargs) for xc in comp]
    with timer("write"):
        model.save_pretrained(args.out)
    seconds = time.perf_counter() - start
    cuda = {}
    if args.device == "cuda":
        cuda["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {
        **cuda,
        "method": args.method,
        "ratio": args.ratio,
        "seconds": round(seconds, 2),
        "stage_seconds": {k: round(v, 2) for k, v in sorted(timer.seconds.items())},
        "other_seconds": round(max(0.0, seconds - sum(timer.seconds.values())), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=list(METHODS), default="svd")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--summary-json", required=True)
    args = parser.parse_args()
    return_freed_memory()  # as streamsvd's CLI does: the comparison is of what is alive
    torch.set_grad_enabled(False)
    Path(args.summary_json).write_text(json.dumps(compress_in_memory(args), indent=2))


if __name__ == "__main__":
    main()
