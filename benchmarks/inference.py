"""What a compressed model costs to run: dense vs low-rank, as ratios to dense measured in
one run on this machine.

    .venv/bin/python benchmarks/inference.py [--threads 2] [--repeats 5]

1. SmolLM2-135M (float32): the original and its low-rank outputs at ratios 0.2, 0.4, 0.6,
   each loaded in a fresh process (for its peak RSS): prefill tokens/s (one 512-token
   sequence), decode tokens/s (128 new tokens, greedy, batch 1 and batch 8, KV cache on),
   peak RSS of load + runs, size on disk. The low-rank outputs are written by
   `streamsvd compress --method svd`: speed depends on the ranks only, which are the same
   for every method at a ratio, and plain SVD needs no calibration pass.
2. One decoder block of Llama-2-7B's width (hidden 4096, intermediate 11008, float32,
   random weights: speed does not depend on the values), dense and with every linear
   low-rank at the same ratios: prefill (one 512-token sequence) and a decode step (batch 1
   and 8, one new token against a 512-token KV cache).
3. Per linear shape, where low-rank starts to pay: time of x·Wᵀ against (x·Bᵀ)·Aᵀ for one
   token and for 512, over ratios 0.05…0.9; the break-even ratio is the smallest measured
   ratio at which the two factors are faster.

Every time is the median of --repeats runs after a warm-up. Writes
benchmarks/results/inference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
import torch  # noqa: E402

from streamsvd.factorize import rank_for  # noqa: E402
from streamsvd.memory import peak_rss_bytes  # noqa: E402

RESULTS = common.ROOT / "benchmarks" / "results"
RATIOS = (0.2, 0.4, 0.6)
MiB = 2**20


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_model(path: str, repeats: int) -> dict:
    """In this (fresh) process: load the model, time prefill and decode, report peak RSS."""
    from streamsvd.lowrank import load_model

    model = load_model(path).float().eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab, (1, 512), generator=gen)
    prefill = median_seconds(lambda: model(prompt, use_cache=False), repeats)
    out = {"prefill_tokens_per_s": 512 / prefill}
    for batch in (1, 8):
        start = torch.randint(10, vocab, (batch, 16), generator=gen)
        kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        seconds = median_seconds(lambda s=start, k=kw: model.generate(s, **k), max(1, repeats // 2))
        out[f"decode_b{batch}_tokens_per_s"] = batch * 128 / seconds
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["disk_bytes"] = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    return out


def smollm2_rows(args, work: Path) -> list[dict]:
    original = common.smollm2()
    models = [("dense", 0.0, str(original))]
    for ratio in RATIOS:
        out = work / f"svd-{ratio}"
        subprocess.run([sys.executable, "-m", "streamsvd.cli", "-q", "compress", "--model",
                        str(original), "--out", str(out), "--ratio", str(ratio), "--method",
                        "svd"], check=True)  # fmt: skip
        models.append(("low-rank", ratio, str(out)))
    rows = []
    for kind, ratio, path in models:
        done = subprocess.run([sys.executable, __file__, "--one", path, "--repeats",
                               str(args.repeats), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        row = {"model": "SmolLM2-135M", "kind": kind, "ratio": ratio,
               **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def random_block(ratio: float | None):
    """A Llama-2-7B-width decoder block, float32, random; every linear low-rank at `ratio`."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from streamsvd.model import linear_layers
    from streamsvd.modeling import LowRankLinear, replace_module

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    config._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(config, layer_idx=0).eval()
    if ratio:
        for name, layer in linear_layers(block).items():
            m, n = layer.weight.shape
            replace_module(block, name, LowRankLinear(n, m, rank_for(m, n, ratio), False))
    return block, LlamaRotaryEmbedding(config), config


@torch.inference_mode()
def block_rows(args) -> list[dict]:
    from transformers import DynamicCache

    rows = []
    for ratio in (None, *RATIOS):
        block, rotary, config = random_block(ratio)
        x = torch.randn(1, 512, 4096)
        pos = torch.arange(512)[None]
        cos_sin = rotary(x, pos)
        prefill = median_seconds(
            lambda b=block, x=x, cs=cos_sin: b(x, position_embeddings=cs), args.repeats
        )
        row = {"model": "7B-width block", "kind": "low-rank" if ratio else "dense",
               "ratio": ratio or 0.0, "prefill_tokens_per_s": 512 / prefill}  # fmt: skip
        for batch in (1, 8):
            cache = DynamicCache(config=config)
            k = torch.randn(batch, 32, 512, 128)
            cache.update(k, k.clone(), 0)
            step = torch.randn(batch, 1, 4096)
            step_pos = rotary(step, torch.full((batch, 1), 512))

            def decode(block=block, cache=cache, step=step, step_pos=step_pos):
                block(step, position_embeddings=step_pos, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # undo the step: every timed step sees 512 cached tokens

            row[f"decode_b{batch}_tokens_per_s"] = batch / median_seconds(decode, args.repeats)
        row["params"] = sum(p.numel() for p in block.parameters())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@torch.inference_mode()
def shape_rows(args) -> list[dict]:
    """Dense x·Wᵀ against two factors, per shape and ratio, for 1 and 512 tokens."""
    shapes = {
        "SmolLM2 mlp (1536×576)": (1536, 576),
        "SmolLM2 attn (576×576)": (576, 576),
        "7B attn (4096×4096)": (4096, 4096),
        "7B mlp (11008×4096)": (11008, 4096),
    }
    rows = []
    for label, (m, n) in shapes.items():
        W = torch.randn(m, n)
        for tokens in (1, 512):
            x = torch.randn(tokens, n)
            dense = median_seconds(lambda x=x, W=W: x @ W.T, args.repeats * 4)
            for ratio in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                r = rank_for(m, n, ratio)
                A, B = torch.randn(m, r), torch.randn(r, n)
                low = median_seconds(lambda x=x, A=A, B=B: (x @ B.T) @ A.T, args.repeats * 4)
                rows.append({"shape": label, "tokens": tokens, "ratio": ratio, "rank": r,
                             "time_vs_dense": low / dense})  # fmt: skip
    return rows


def break_even(rows: list[dict], shape: str, tokens: int) -> float | None:
    mine = [r for r in rows if r["shape"] == shape and r["tokens"] == tokens]
    paying = [r["ratio"] for r in mine if r["time_vs_dense"] < 1]
    return min(paying) if paying else None


def markdown(result: dict) -> str:
    keys = ["prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"]
    lines = [f"# Inference cost, dense vs low-rank ({result['device']}, {result['threads']} "
             f"threads)", "", f"Command: `{result['command']}`", "",
             "Ratios to dense, measured in one run (above 1: faster / larger).", "",
             "| model | ratio | prefill 512 tok/s | decode b1 tok/s | decode b8 tok/s | "
             "peak RSS | size on disk |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for group in ("SmolLM2-135M", "7B-width block"):
        rows = [r for r in result["models"] if r["model"] == group]
        dense = rows[0]
        for r in rows[1:]:
            cells = [f"{r[k] / dense[k]:.2f}" for k in keys]
            for k in ("peak_rss_bytes", "disk_bytes"):
                cells.append(f"{r[k] / dense[k]:.2f}" if k in r else "–")
            lines.append(f"| {group} | {r['ratio']} | " + " | ".join(cells) + " |")
        absolute = ", ".join(
            f"{k.removesuffix('_tokens_per_s')} {dense[k]:.0f} tok/s" for k in keys
        )
        extra = ""
        if "disk_bytes" in dense:
            extra = (f", peak RSS {dense['peak_rss_bytes'] / MiB:.0f} MiB, "
                     f"disk {dense['disk_bytes'] / MiB:.0f} MiB")  # fmt: skip
        lines.append(f"| {group} dense | — | {absolute}{extra} | | | | |")
    lines += ["", "Break-even per linear shape: the smallest ratio (of those measured, "
              "0.05–0.9) at which the two factors are faster than W.", "",
              "| shape | 1 token (decode) | 512 tokens (prefill) |", "|---|---|---|"]  # fmt: skip
    for shape in dict.fromkeys(r["shape"] for r in result["shapes"]):
        cells = [break_even(result["shapes"], shape, t) for t in (1, 512)]
        lines.append(f"| {shape} | " + " | ".join(str(c) if c else "never" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one", help=argparse.SUPPRESS)  # measure one model in this process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_model(args.one, args.repeats)))
        return
    import platform

    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/inference.py", *sys.argv[1:]]),
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["models"] = smollm2_rows(args, Path(tmp)) + block_rows(args)
    result["shapes"] = shape_rows(args)
    text = markdown(result)
    common.save(RESULTS, "inference", result, text)
    print(text, end="")


if __name__ == "__main__":
    main()
