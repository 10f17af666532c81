"""`streamsvd` with refinement's bf16 autocast emulated in float32 arithmetic: what
`--refine-precision bfloat16` does to quality, measured on a CPU without native bf16, where
torch's CPU autocast multiplies ~10× slower than float32 (a 2048×576 by 576×1536 product:
0.23 s against 0.023 s on this project's 2-core machine), too slow for a 16-epoch run.

Autocast casts a matrix product's operands to bf16 and returns its result in bf16; the
product accumulates in float32 (a GPU's tensor cores, oneDNN on a CPU). The emulation makes
the same roundings: operands rounded to bf16, multiplied in float32, the result rounded to
bf16 and handed on as a bf16 tensor, so the ops after it (SiLU·up, the residual sum) see
the dtypes they would under autocast, and gradients flowing back through the casts are
rounded where autocast's are. What differs: the order of the float32 accumulation, and
attention's inside (a GPU's flash attention rounds its probabilities to bf16 before
multiplying by V; here they stay float32). `--check` measures the difference on one block
of SmolLM2 against torch's own CPU autocast.

    python benchmarks/bf16_emulation.py compress --model M --out O --refine-precision bfloat16
    python benchmarks/bf16_emulation.py --check [--results benchmarks/results]
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PRODUCTS = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul,
            torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.addmm, torch.baddbmm,
            torch.nn.functional.scaled_dot_product_attention}  # fmt: skip


class EmulatedAutocast(TorchFunctionMode):
    """bf16 autocast's roundings around every matrix product, in float32 arithmetic."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)

        def rounded(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(torch.bfloat16).float()
            return value

        out = func(*map(rounded, args), **{k: rounded(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16)


def emulated_mixed_precision(device_type: str, dtype: torch.dtype | None):
    """streamsvd.refine.mixed_precision, with bf16 autocast emulated on a CPU."""
    if dtype is None:
        return contextlib.nullcontext()
    if device_type != "cpu" or dtype != torch.bfloat16:
        return torch.autocast(device_type, dtype=dtype)
    return EmulatedAutocast()


def check(results: Path) -> dict:
    """Refine block 0 of SmolLM2 (its closed form at ratio 0.4, fed its own inputs plus
    noise) three ways: float32, torch's CPU bf16 autocast, and the emulation; how far apart
    their updates to the factors end, and each one's loss in the first and last epoch; and
    float32 again on another number of threads (the same arithmetic summed in another
    order), for rounding's own scale."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import streamsvd.refine as refine

    torch.manual_seed(0)
    path = common.smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dense = model.model.layers[0]
    windows, seqlen = 16, 128
    text = (common.DATA_DIR / "valid.txt").read_text()[:100_000]
    ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids[0]
    ids = ids[: windows * seqlen].view(windows, seqlen)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        positions = torch.arange(seqlen)[None].expand(4, seqlen)
        arguments = {4: {"position_embeddings": model.model.rotary_emb(x[:4], positions),
                         "attention_mask": None}}  # fmt: skip
        target = dense(x, position_embeddings=model.model.rotary_emb(
            x, torch.arange(seqlen)[None].expand(windows, seqlen)))  # fmt: skip
        target = target[0] if isinstance(target, tuple) else target
        x_comp = x + 0.05 * x.std() * torch.randn(x.shape)
    steps = [(s, s + 4) for s in range(0, windows, 4)]
    runs, original = {}, refine.mixed_precision
    threads = torch.get_num_threads()
    for name, context in [("float32", None), ("float32, other threads", None),
                          ("autocast", original),
                          ("emulated", emulated_mixed_precision)]:  # fmt: skip
        # the same float32 arithmetic, summed in another order: rounding's own scale
        torch.set_num_threads(threads if name != "float32, other threads" else
                              (2 if threads == 1 else 1))  # fmt: skip
        block = _closed_form(dense)
        start = torch.cat([p.detach().reshape(-1) for p in block.parameters()])
        refine.mixed_precision = context or original
        precision = "float32" if context is None else "bfloat16"
        settings = refine.RefineSettings(epochs=4, lr=3e-4, precision=precision)
        try:
            info = refine.refine_block(block, arguments, steps, lambda a, b: x_comp[a:b],
                                       lambda a, b: target[a:b], settings, 0,
                                       torch.float32)  # fmt: skip
        finally:
            refine.mixed_precision = original
        moved = torch.cat([p.detach().reshape(-1) for p in block.parameters()]) - start
        runs[name] = {"update": moved, "loss": [info["loss_first_epoch"],
                                                   info["loss_last_epoch"]]}  # fmt: skip

    def distance(a: str, b: str) -> float:  # of what refinement changed, not of the factors
        return float((runs[a]["update"] - runs[b]["update"]).norm() / runs[b]["update"].norm())

    result = {
        "what": "SmolLM2 block 0, ratio-0.4 plain SVD, 16 WikiText-2 validation windows of 128 "
                "tokens plus 5% noise, "
                "4 epochs of 4-window steps at lr 3e-4",
        "loss_first_last": {k: v["loss"] for k, v in runs.items()},
        "command": common.command_line("bf16_emulation.py"),
        "threads": threads,
        "relative_distance": {"emulated_vs_autocast": distance("emulated", "autocast"),
                              "float32_other_threads_vs_float32": distance(
                                  "float32, other threads", "float32"),
                              "float32_vs_autocast": distance("float32", "autocast"),
                              "float32_vs_emulated": distance("float32", "emulated")},
    }  # fmt: skip
    common.save(results, "bf16_emulation", result, _markdown(result))
    return result


def _closed_form(dense: torch.nn.Module) -> torch.nn.Module:
    """The block with every linear replaced by its plain truncated SVD at ratio 0.4."""
    from streamsvd.factorize import plain_svd, rank_for
    from streamsvd.modeling import LowRankLinear, replace_module

    block = copy.deepcopy(dense)
    for name, module in list(block.named_modules()):
        if isinstance(module, torch.nn.Linear):
            A, B = plain_svd(module.weight.detach(), None, rank_for(*module.weight.shape, 0.4))
            replace_module(block, name, LowRankLinear.from_factors(A, B, module.bias,
                                                                   torch.float32))  # fmt: skip
    return block


def _markdown(result: dict) -> str:
    lines = ["# bf16 autocast emulated in float32 arithmetic, against torch's CPU autocast", "",
             result["what"] + f" (`{result['command']}`).", "",
             "| refinement | loss, first epoch | loss, last epoch |", "|---|---|---|"]  # fmt: skip
    for name, (first, last) in result["loss_first_last"].items():
        lines.append(f"| {name} | {first:.6g} | {last:.6g} |")
    other = 2 if result["threads"] == 1 else 1
    lines += ["", f"Threads: {result['threads']} (the other-threads run: {other}).", "",
              "| updates to the factors | relative distance |", "|---|---|"]  # fmt: skip
    distances = result["relative_distance"].items()
    lines += [f"| {k.replace('_', ' ')} | {v:.3g} |" for k, v in distances]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import streamsvd.refine

    if sys.argv[1:2] == ["--check"]:
        print(check(Path(sys.argv[3]) if sys.argv[2:3] == ["--results"] else
                    Path(__file__).resolve().parent / "results"))  # fmt: skip
    else:
        streamsvd.refine.mixed_precision = emulated_mixed_precision
        from streamsvd.cli import main

        sys.exit(main(sys.argv[1:]))
