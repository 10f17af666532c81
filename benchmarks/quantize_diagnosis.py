"""Why quantized factors broke at ratio 0.4 (docs/quantization.md), in two measurements on
SmolLM2-135M (16 calibration windows of valid.txt, 24 windows of test.txt: a quick look,
not the P1 protocol).

    python benchmarks/quantize_diagnosis.py layers [--blocks 0 10 20 29] [--ratio 0.4]
    python benchmarks/quantize_diagnosis.py outputs OUT [OUT ...]

- layers: each linear's whitened factors at the ratio (ranks rounded to whole groups of
  64, as --bits does), from the original model's inputs; GPTQ at 4 bits of the pair as it
  is and rotated in its rank space (`quantize.rank_rotation`). The relative output error
  ‖(W − A_q B_q) L‖ / ‖W L‖ (L Lᵀ the inputs' Gram) of each, against the unquantized pair's.
- outputs: for compressed outputs, perplexity on the 24 test windows and the relative
  error of each block's hidden states against the original model's, on 4 of them: where
  a run goes wrong.

Writes benchmarks/results/quantize_diagnosis_{layers,outputs}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd import load_compressed  # noqa: E402
from streamsvd.calib import calibration_windows, eval_windows, tokenize  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.evaluate import perplexity  # noqa: E402
from streamsvd.factorize import rank_for, whitened_truncation  # noqa: E402
from streamsvd.quantize import gptq, inverse_factor, quantized_rank, rank_rotation  # noqa: E402
from streamsvd.stats import damped_cholesky  # noqa: E402

TITLE = {
    "layers": "Quantized factors, layer by layer: as they are and rotated in their rank space",
    "outputs": "Quantized outputs, block by block: where a run goes wrong",
}
DATA = ROOT.parent / "shared/data/wikitext-2"
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def relative_error(W, Wq, L) -> float:
    return float(torch.linalg.norm((W - Wq) @ L) / torch.linalg.norm(W @ L))


def quantized_pair(A, B, G, bits: int, group: int):
    Bq = gptq(B.float(), None, bits, group, True, Hinv=inverse_factor(G, torch.float32),
              scale_dtype=torch.float32).dequantize().double()  # fmt: skip
    Aq = gptq(A.float(), None, bits, group, True,
              Hinv=inverse_factor(Bq @ G @ Bq.T, torch.float32),
              scale_dtype=torch.float32).dequantize().double()  # fmt: skip
    return Aq, Bq


def layers(args, model, tok) -> dict:
    text = (DATA / "valid.txt").read_text()
    windows = torch.as_tensor(calibration_windows(tokenize(tok, text), 16, 512, 0))
    grams = {}
    for b in args.blocks:
        for name in LINEARS:

            def hook(module, inputs, output, key=(b, name)):  # noqa: ANN001
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x

            model.model.layers[b].get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(windows[i : i + 4])
    rows = []
    for (b, name), G in grams.items():
        W = model.model.layers[b].get_submodule(name).weight.detach().double()
        L = damped_cholesky(G)
        rank = quantized_rank(rank_for(*W.shape, args.ratio), 64, tuple(W.shape))
        A, B = whitened_truncation(W, L, rank)
        R = rank_rotation(rank)
        row = {"block": b, "linear": name, "rank": rank,
               "unquantized": relative_error(W, A @ B, L)}  # fmt: skip
        Aq, Bq = quantized_pair(A, B, G, args.bits, 64)
        row["as is"] = relative_error(W, Aq @ Bq, L)
        Aq, Bq = quantized_pair(A @ R, R.T @ B, G, args.bits, 64)
        row["rotated"] = relative_error(W, Aq @ Bq, L)
        print(row, flush=True)
        rows.append(row)
    lines = [f"| block | linear | rank | unquantized | {args.bits}-bit as is | "
             f"{args.bits}-bit rotated |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['block']} | {r['linear']} | {r['rank']} | {r['unquantized']:.4f} | "
                     f"{r['as is']:.4f} | {r['rotated']:.4f} |")  # fmt: skip
    return {"ratio": args.ratio, "bits": args.bits, "rows": rows, "table": lines}


def outputs(args, model, tok) -> dict:
    text = (DATA / "test.txt").read_text()
    test = torch.as_tensor(eval_windows(tokenize(tok, text), 512, 24))
    with torch.no_grad():
        want = model(test[:4], output_hidden_states=True).hidden_states
    rows = []
    for path in args.outputs:
        with torch.no_grad():
            m = load_compressed(path).float().eval()
            got = m(test[:4], output_hidden_states=True).hidden_states
            errors = [float(torch.linalg.norm(g - w) / torch.linalg.norm(w))
                      for g, w in zip(got, want, strict=True)]  # fmt: skip
        rows.append({"output": str(path), "perplexity": perplexity(path, test, progress=False),
                     "hidden_state_errors": errors})  # fmt: skip
        print(rows[-1], flush=True)
    lines = ["| output | perplexity (24 windows) | hidden-state error after blocks 1, 2, … |",
             "|---|---|---|"]  # fmt: skip
    for r in rows:
        errs = " ".join(f"{e:.2f}" for e in r["hidden_state_errors"][1:])
        lines.append(f"| {Path(r['output']).name} | {r['perplexity']:.2f} | {errs} |")
    return {"rows": rows, "table": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    lay = sub.add_parser("layers")
    lay.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    lay.add_argument("--ratio", type=float, default=0.4)
    lay.add_argument("--bits", type=int, default=4)
    out = sub.add_parser("outputs")
    out.add_argument("outputs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = (layers if args.mode == "layers" else outputs)(args, model, tok)
    result["command"] = "python benchmarks/quantize_diagnosis.py " + " ".join(sys.argv[1:])
    name = f"quantize_diagnosis_{args.mode}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = [f"# {TITLE[args.mode]}", "", f"Command: `{result['command']}`", "",
          *result.pop("table"), ""]  # fmt: skip
    (args.results / f"{name}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
