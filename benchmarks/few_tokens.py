"""How many calibration tokens an expert needs before whitening with its own Gram beats
plain SVD — measured on real weights and activations.

A mixture of experts sends each expert only the tokens its router picks; some experts get
few, some none. This measures, on SmolLM2-135M's MLPs (real weights, real WikiText-2
activations), the held-out loss ‖(W − AB)X‖/‖WX‖ of a rank-r factorisation at ratio 0.4
when the whitening Gram comes from only k calibration tokens (k drawn at random from 8,192),
against plain truncated SVD (k = 0: what an expert that saw no token gets). Held-out X:
the first 8 windows of 512 tokens of WikiText-2 test.txt.

    .venv/bin/python benchmarks/few_tokens.py

Writes benchmarks/results/few_tokens.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from streamsvd.calib import calibration_windows, eval_windows, read_text_file, tokenize
from streamsvd.default_model import default_model_path
from streamsvd.factorize import plain_svd, rank_for, whitened_truncation
from streamsvd.lowrank import load_model
from streamsvd.stats import damped_cholesky_

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"
RESULTS = Path(__file__).parent / "results"
BLOCKS = (5, 15, 25)
LINEARS = ("gate_proj", "down_proj")  # up_proj reads gate_proj's input
TOKENS = (0, 8, 32, 128, 512, 2048, 8192)
RATIO = 0.4


@torch.no_grad()
def capture(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of the measured linears over `windows`, as (tokens, n) float64."""
    seen: dict[str, list] = {}
    handles = []
    for b in BLOCKS:
        for name in LINEARS:
            key = f"{b}.{name}"
            layer = model.model.layers[b].mlp.get_submodule(name)
            handles.append(layer.register_forward_pre_hook(
                lambda m, args, key=key: seen.setdefault(key, []).append(
                    args[0].flatten(0, 1).double())))  # fmt: skip
    for w in windows.split(4):
        model(w, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def loss(W, A, B, X) -> float:
    return float(torch.linalg.matrix_norm(X @ (W - A @ B).mT) / torch.linalg.matrix_norm(X @ W.mT))


def main() -> None:
    torch.set_num_threads(2)
    path = default_model_path()
    model = load_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    pool = calibration_windows(tokenize(tok, read_text_file(DATA / "valid.txt")), 16, 512, 0)
    held = eval_windows(tokenize(tok, read_text_file(DATA / "test.txt")), 512, 8)
    X_pool, X_held = capture(model, pool), capture(model, held)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key, X in X_pool.items():
        b, name = key.split(".")
        W = model.model.layers[int(b)].mlp.get_submodule(name).weight.detach().double()
        rank = rank_for(*W.shape, RATIO)
        for k in TOKENS:
            if k == 0:
                A, B = plain_svd(W, None, rank)
            else:
                x = X[torch.randperm(len(X), generator=gen)[:k]]
                L = damped_cholesky_((x.mT @ x).contiguous(), what=f"{key} k={k}")
                A, B = whitened_truncation(W, L, rank)
            rows.append({"linear": f"layers.{key}", "shape": list(W.shape), "rank": rank,
                         "tokens": k, "held_out_loss": loss(W, A.double(), B.double(),
                                                            X_held[key])})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = " ".join([".venv/bin/python", "benchmarks/few_tokens.py", *sys.argv[1:]])
    (RESULTS / "few_tokens.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2)
    )
    linears = list(dict.fromkeys(r["linear"] for r in rows))
    lines = [f"Held-out ‖(W − AB)X‖/‖WX‖ at ratio {RATIO}, SmolLM2-135M, whitening from k "
             f"calibration tokens (k = 0: plain SVD). Command: `{command}`", "",
             "| linear (shape, rank) | " + " | ".join(f"k = {k}" for k in TOKENS) + " |",
             "|---|" + "---|" * len(TOKENS)]  # fmt: skip
    for lin in linears:
        rs = [r for r in rows if r["linear"] == lin]
        head = f"{lin} ({rs[0]['shape'][0]}×{rs[0]['shape'][1]}, {rs[0]['rank']})"
        lines.append(f"| {head} | " + " | ".join(f"{r['held_out_loss']:.3f}" for r in rs) + " |")
    (RESULTS / "few_tokens.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
