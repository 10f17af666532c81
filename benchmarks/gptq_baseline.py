"""Plain GPTQ of the dense model, made with llm-compressor: the baseline quantized factors
are measured against (benchmarks/quantized.py runs this, in llm-compressor's own
environment: it pins a transformers of its own).

    python benchmarks/gptq_baseline.py MODEL CALIB.pt OUT --bits 4 --group-size 64

CALIB.pt holds the calibration windows as token ids (N × T), the same ones streamsvd
calibrates on; OUT is written compressed (compressed-tensors pack-quantized). Every linear
of every block is quantized (symmetric, per group), the LM head is not: what streamsvd
leaves dense, this leaves in its dtype too.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("calib", help="a .pt file of token-id windows (N × T)")
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    windows = torch.load(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": windows.tolist(),
                              "attention_mask": torch.ones_like(windows).tolist()})  # fmt: skip
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}  # fmt: skip
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"])  # fmt: skip
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT", json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
