"""Block refinement's settings, probed one block at a time on held-out windows.

A full held-out cell (benchmarks/refine.py) costs 30-60 minutes on 2 cores, so the
settings it tried were few: 2 epochs of 8-window micro-batches is 16 optimiser steps a
block. This probe asks the cheaper question first: for one block, which epochs, learning
rate and micro-batch bring the block's output closest to its target on windows it was
not trained on?

It runs the default method (held-out protocol: calibration from the first 80% of
valid.txt) with closed-form blocks up to each block asked for, and there, instead of
refining once, trains a copy of the block under every setting on the first windows and
measures the mean squared error on the last ones: against refinement's target (λ-mixed),
against the original model's outputs, and as the share of the closed form's error left.
The run stops after the last block asked for; test.txt is not read.

    .venv/bin/python benchmarks/refine_probe.py --blocks 10 --settings 2:1e-4:8 8:1e-3:2

A setting is `epochs:lr:micro-batch`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tune_lambda import heldout_split  # noqa: E402  (benchmarks/, the script's folder)

from streamsvd import pipeline, run, step  # noqa: E402
from streamsvd.default_model import default_model_path  # noqa: E402
from streamsvd.model import run_block  # noqa: E402
from streamsvd.refine import DEFAULT_TARGET, RefineSettings, refine_block  # noqa: E402


class Done(Exception):
    """Raised after the last probed block: the rest of the run is not needed."""


def parse_setting(text: str) -> dict:
    epochs, lr, batch = text.split(":")
    return {"epochs": int(epochs), "lr": float(lr), "batch": int(batch)}


def probe_block(bstep, read, read_next, settings: list[dict], train: int, target_mix: float,
                dtype) -> list[dict]:  # fmt: skip
    """Every setting on a copy of bstep's closed-form block; error on windows ≥ `train`."""
    sizes = sorted({s["batch"] for s in settings} | {1})
    arguments = {b: _first(bstep.arguments[max(bstep.arguments)], b) for b in sizes}
    n = max(stop for _, stop in bstep.batches)
    with torch.inference_mode(), step._swapped(bstep.block, bstep.dense):
        x = torch.cat([read("comp", a, b) for a, b in bstep.batches]).float()
        y = torch.cat([read_next("orig", a, b) for a, b in bstep.batches]).float()
        dense = torch.cat([run_block(bstep.block, x[i : i + 1], arguments) for i in range(n)])
    with torch.inference_mode(False):  # autograd saves x; inference tensors cannot be saved
        x, y = x.clone(), y.clone()
        target = torch.lerp(dense, y, target_mix).clone()

    def errors(block) -> dict:
        with torch.inference_mode():
            out = torch.cat([run_block(block, x[i : i + 1], arguments) for i in range(train, n)])
        return {"target_mse": torch.mean((out - target[train:]) ** 2).item(),
                "original_mse": torch.mean((out - y[train:]) ** 2).item()}  # fmt: skip

    rows = [{"setting": "closed form", **errors(bstep.block)}]
    for s in settings:
        block = copy.deepcopy(bstep.block)
        batches = [(a, min(a + s["batch"], train)) for a in range(0, train, s["batch"])]
        t0 = time.perf_counter()
        losses = refine_block(block, arguments, batches, lambda a, b: x[a:b],
                              lambda a, b: target[a:b],
                              RefineSettings(epochs=s["epochs"], lr=s["lr"], target=target_mix),
                              bstep.index, dtype)  # fmt: skip
        rows.append({"setting": f"{s['epochs']}:{s['lr']:g}:{s['batch']}", **s,
                     "steps": s["epochs"] * len(batches), **errors(block),
                     "train_loss_last_epoch": losses["loss_last_epoch"],
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["target_mse"]
    for r in rows:
        r["share_of_closed_form"] = r["target_mse"] / base
    return rows


def _first(tree, b: int):
    """Keyword arguments made for a larger batch, cut to b samples (tensors whose first
    dimension is the batch; position embeddings broadcast over it)."""
    if isinstance(tree, torch.Tensor):
        return tree[:b] if tree.dim() and tree.shape[0] > 1 else tree
    if isinstance(tree, dict):
        return {k: _first(v, b) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_first(v, b) for v in tree)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/wikitext-2")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--blocks", nargs="+", type=int, default=[10], help="0-based indices")
    parser.add_argument("--settings", nargs="+", type=parse_setting, required=True)
    parser.add_argument("--nsamples", type=int, default=48, help="calibration windows in all")
    parser.add_argument("--train", type=int, default=32, help="of which refinement trains on")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="λ")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", default="refine_probe")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="streamsvd-probe-"))
    calib = tmp / "calib.txt"
    calib.write_text(heldout_split(args.data_dir)[0], encoding="utf-8")
    cfg = pipeline.CompressConfig(model=str(default_model_path()), out=str(tmp / "out"),
                                  ratio=args.ratio, calib=str(calib), nsamples=args.nsamples,
                                  refine_epochs=1, refine_target=args.target)  # fmt: skip
    found = {}

    def refine(self, settings, read, read_next, dtype):
        """In place of BlockStep.refine: probe the asked blocks, keep every block closed-form."""
        if self.index in args.blocks:
            found[self.index] = probe_block(self, read, read_next, args.settings, args.train,
                                            args.target, dtype)  # fmt: skip
            save(args, found)
            if self.index == max(args.blocks):
                raise Done
        self.dense = {}
        return {}

    step.BlockStep.refine = refine
    try:
        run.compress(cfg)
    except Done:
        pass


def save(args, found: dict) -> None:
    what = {"command": "python benchmarks/refine_probe.py " + " ".join(sys.argv[1:]),
            "ratio": args.ratio, "nsamples": args.nsamples, "train": args.train,
            "target": args.target, "blocks": found}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(what, indent=2))
    lines = [
        "# Block refinement settings, probed one block at a time (held out)",
        "",
        f"SmolLM2-135M-Instruct, default method at ratio {args.ratio}, closed-form blocks "
        f"before the probed one; calibration {args.nsamples}×512 from the first 80% of "
        f"valid.txt; each setting trains a copy of the block on the first {args.train} "
        f"windows (λ = {args.target}) and is scored on the other "
        f"{args.nsamples - args.train} (the closed forms' statistics saw all "
        f"{args.nsamples}). Command: `{what['command']}`.",
        "",
        "| block | setting (epochs:lr:batch) | steps | held-out MSE to target | of closed form "
        "| held-out MSE to original | last-epoch train loss | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, rows in found.items():
        for r in rows:
            lines.append(f"| {index} | {r['setting']} | {r.get('steps', '–')} | "
                         f"{r['target_mse']:.4g} | {r.get('share_of_closed_form', 1):.3f} | "
                         f"{r['original_mse']:.4g} | {_num(r.get('train_loss_last_epoch'))} | "
                         f"{r.get('seconds', '–')} |")  # fmt: skip
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    main()
