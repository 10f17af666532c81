"""Why compress and eval run half-precision checkpoints in float32 on a CPU
(model.compute_dtype's "auto"): seconds per matrix product and per decoder-block forward
on this CPU in float32, bfloat16 and float16, at SmolLM2-135M's shapes.

    .venv/bin/python benchmarks/bf16_cpu.py

Writes benchmarks/results/bf16_cpu.{json,md}. The block is SmolLM2's block 0 (the bundled
model), fed 8 windows of 512 random tokens' embeddings, as compress feeds it a micro-batch.
"""

from __future__ import annotations

import json
import platform
import sys
import timeit
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.default_model import default_model_path  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    config = model.config
    block = model.model.layers[0]
    tokens = torch.randint(0, config.vocab_size, (8, 512))
    hidden = model.model.embed_tokens(tokens).detach()
    position = torch.arange(512)[None].expand(8, -1)
    rows = []
    for dtype in DTYPES:
        a = torch.randn(8 * 512, config.hidden_size, dtype=dtype)
        w = torch.randn(config.intermediate_size, config.hidden_size, dtype=dtype)
        matmul = best_seconds(lambda a=a, w=w: a @ w.T)
        block.to(dtype)
        h = hidden.to(dtype)
        rotary = model.model.rotary_emb(h, position)
        with torch.inference_mode():
            forward = best_seconds(lambda h=h, rotary=rotary: block(h, position_embeddings=rotary),
                                   repeats=1)  # fmt: skip
        rows.append({"dtype": str(dtype).removeprefix("torch."), "matmul_seconds": matmul,
                     "block_forward_seconds": forward})  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        "what": "one 4096×576 by 576×1536 product (an MLP projection of a micro-batch of 8×512 "
        "tokens), and one forward of SmolLM2-135M's block 0 on 8×512 tokens; best of 3 "
        "(the forward: of 1, after a warm-up)",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": "python benchmarks/bf16_cpu.py",
        "rows": rows,
    }
    out = ROOT / "benchmarks/results"
    (out / "bf16_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    base = rows[0]
    lines = [
        "# Half precision on a CPU",
        "",
        f"{result['what']}. CPU capability {result['cpu_capability']}, "
        f"{result['threads']} threads. Command: `{result['command']}`.",
        "",
        "| dtype | matmul (s) | × float32 | block forward (s) | × float32 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['matmul_seconds']:.4f} | "
            f"{r['matmul_seconds'] / base['matmul_seconds']:.1f} | "
            f"{r['block_forward_seconds']:.3f} | "
            f"{r['block_forward_seconds'] / base['block_forward_seconds']:.1f} |"
        )
    (out / "bf16_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
