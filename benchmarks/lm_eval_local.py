"""lm-evaluation-harness on SmolLM2, offline: the original, the low-rank outputs at ratios
0.2 and 0.4 (default method, P1 calibration) and their dense exports.

    .venv/bin/pip install -e ".[eval]"   # lm-eval: not a dependency of streamsvd itself
    .venv/bin/python benchmarks/lm_eval_local.py [--limit-docs 16] [--limit-items 300]

Tasks are local YAML (benchmarks/lm_eval_tasks/) over local data, so nothing is fetched
from a hub: `streamsvd_wikitext2` (rolling log-likelihood over WikiText-2 test articles,
as lm-eval's `wikitext`) and `streamsvd_next_sentence` (multiple choice: which of four
sentences follows a two-sentence context from a test article; three distractors of
similar length from other articles; chance 25%). This script writes their data from
../shared/data/wikitext-2/test.txt, compresses if the outputs are not there yet, and runs
`lm_eval --model hf` (the low-rank outputs with trust_remote_code=True, through their own
modeling code) with `max_length=512`, so that each article is scored in 512-token windows
as P1 scores its windows. lm-eval reports word perplexity; the token perplexity beside it
is exp(−Σ log-likelihood / Σ tokens) from the same run (tokens counted with the model's
tokenizer, one EOT-prefixed scoring per article as lm-eval does). Writes
benchmarks/results/lm_eval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

DATA = common.DATA_DIR
WORK = common.ROOT / "benchmarks" / "runs" / "lm_eval"
TASKS = common.ROOT / "benchmarks" / "lm_eval_tasks"
RESULTS = common.ROOT / "benchmarks" / "results"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def articles(text: str) -> list[str]:
    """WikiText-2 split at its top-level headings (" = Title = " lines)."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line) and current:
            docs.append("".join(current))
            current = []
        current.append(line)
    docs.append("".join(current))
    return [d for d in docs if d.strip()]


def sentences(doc: str) -> list[str]:
    body = " ".join(line.strip() for line in doc.splitlines() if line.strip() and
                    not line.strip().startswith("="))  # fmt: skip
    return [s.strip() for s in re.split(r"(?<= \.) ", body) if len(s.split()) >= 6]


def write_data(n_items: int) -> None:
    out = WORK / "data"
    out.mkdir(parents=True, exist_ok=True)
    docs = articles((DATA / "test.txt").read_text(encoding="utf-8"))
    with open(out / "wikitext2_test_docs.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"page": doc}) + "\n")
    rng = random.Random(0)
    per_doc = [sentences(d) for d in docs]
    pool = [(i, s) for i, ss in enumerate(per_doc) for s in ss]
    items = []
    while len(items) < n_items:
        d = rng.randrange(len(docs))
        if len(per_doc[d]) < 4:
            continue
        k = rng.randrange(len(per_doc[d]) - 2)
        context, answer = " ".join(per_doc[d][k : k + 2]), per_doc[d][k + 2]
        similar = [s for i, s in pool if i != d and abs(len(s) - len(answer)) < 0.3 * len(answer)]
        choices = [answer, *rng.sample(similar, 3)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    with open(out / "next_sentence.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def models(only: str | None = None) -> list[tuple[str, float, Path]]:
    """The original and, at each ratio, its low-rank output (compressed on P1's calibration
    if not there yet) and that output's dense export."""
    p1 = common.protocol("p1", DATA)
    found = [("original", 0.0, common.smollm2())]
    if only == "original":
        return found
    for ratio in (0.2, 0.4):
        if only and only != str(ratio):
            continue
        low = WORK / f"svdllm-a-{ratio}"
        if not low.exists():
            subprocess.run([sys.executable, "-m", "streamsvd.cli", "compress", "--model",
                            str(found[0][2]), "--out", str(low), "--ratio", str(ratio),
                            "--calib", str(p1.calib), "--nsamples", str(p1.nsamples),
                            "--seqlen", str(p1.seqlen), "--seed", "0"], check=True)  # fmt: skip
        dense = WORK / f"svdllm-a-{ratio}-dense"
        if not dense.exists():
            subprocess.run([sys.executable, "-m", "streamsvd.cli", "export-dense", "--model",
                            str(low), "--out", str(dense)], check=True)  # fmt: skip
        found += [("low-rank", ratio, low), ("dense export", ratio, dense)]
    return found[1:] if only else found


def run_lm_eval(path: Path, args) -> dict:
    out = WORK / "out" / path.name
    remote = ",trust_remote_code=True" if (path / "modeling_streamsvd.py").exists() else ""
    results = {}
    for task, limit in (("streamsvd_wikitext2", args.limit_docs),
                        ("streamsvd_next_sentence", args.limit_items)):  # fmt: skip
        kept = out / f"{task}-limit{limit}.json"  # a task's results are kept between runs
        if kept.exists():
            results[task] = json.loads(kept.read_text())
            continue
        cmd = ["lm_eval", "--model", "hf", "--model_args",
               f"pretrained={path},dtype=float32,max_length=512{remote}", "--tasks", task,
               "--include_path", str(TASKS), "--batch_size", "8", "--limit", str(limit),
               "--output_path", str(out / task), "--log_samples"]  # fmt: skip
        subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], check=True,
                       env={**os.environ, **OFFLINE}, cwd=common.ROOT)  # fmt: skip
        newest = sorted((out / task).rglob("results_*.json"))[-1]
        results[task] = json.loads(newest.read_text())["results"][task]
        if task == "streamsvd_wikitext2":
            samples = sorted((out / task).rglob(f"samples_{task}_*.jsonl"))[-1]
            results[task]["token_perplexity"] = token_perplexity(path, samples)
        kept.write_text(json.dumps(results[task]))
    return results


def token_perplexity(path: Path, samples: Path) -> float:
    from streamsvd.model import load_tokenizer

    tok = load_tokenizer(path)
    nll = tokens = 0.0
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        nll -= float(s["word_perplexity"][0])  # [log-likelihood of the article, its words]
        tokens += len(tok(s["target"], add_special_tokens=False).input_ids)
    return math.exp(nll / tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--limit-docs",
        type=int,
        default=12,
        help="WikiText-2 test articles (12: 71k tokens, P1's 65,536 and a little)",
    )
    p.add_argument(
        "--only",
        choices=["original", "0.2", "0.4"],
        help="run one model and keep its results for a later full run",
    )
    p.add_argument("--limit-items", type=int, default=100, help="next-sentence items")
    args = p.parse_args()
    write_data(args.limit_items)
    rows = []
    for kind, ratio, path in models(args.only):
        rows.append({"model": kind, "ratio": ratio, "path": str(path),
                     "results": run_lm_eval(path, args)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if args.only:
        return
    command = " ".join([".venv/bin/python", "benchmarks/lm_eval_local.py", *sys.argv[1:]])
    lines = [f"lm-eval (`lm_eval --model hf`, local tasks), SmolLM2-135M. Command: `{command}`",
             f"(first {args.limit_docs} WikiText-2 test articles; {args.limit_items} "
             "next-sentence items)", "",
             "| model | ratio | wikitext2 word ppl | token ppl | bits/byte | next-sentence "
             "acc | acc_norm |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        w, m = r["results"]["streamsvd_wikitext2"], r["results"]["streamsvd_next_sentence"]
        lines.append(f"| {r['model']} | {r['ratio']} | {w['word_perplexity,none']:.2f} | "
                     f"{w.get('token_perplexity', float('nan')):.2f} | "
                     f"{w['bits_per_byte,none']:.3f} | {m['acc,none']:.3f} ± "
                     f"{m['acc_stderr,none']:.3f} | {m['acc_norm,none']:.3f} |")  # fmt: skip
    common.save(RESULTS, "lm_eval", {"command": command, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
