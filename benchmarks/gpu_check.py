"""The CUDA path on synthetic checkpoints, as one prepared script for a lent GPU (a session
gets about 15 minutes of one): CUDA against CPU on the same checkpoint, and the plan
against measured runs at 7B width: the closed form, the default (block refinement), and the
default with 4-bit factors; and the speed probe's rates at three sizes, since the plan's time
on a GPU extrapolates from 1024² products.

    python benchmarks/gpu_check.py --results DIR    # on the GPU machine; DIR: its $OUT

0. Probe: the rates `speed.measure_speed` reads on the GPU at 1024, 2048 and 4096 (what the
   plan uses there since 2026-11-29; 1024 before): whether they extrapolate to a 7B block's
   widths.
1. Scale: a 7B-width checkpoint (Llama-2-7B's shape, 2 blocks, bfloat16) with the compress
   defaults (64×512 calibration, refinement on), `--dry-run` then the run, each variant:
   seconds per block and peak device and host memory by phase, measured against the plan.
   Before the equivalence: it is what a lent GPU is for.
2. Factorise: each linear of a 7B-width block factorised alone (svdllm-a, random inputs of
   the default 32768 tokens), the device memory it allocates beyond W and its group's sums
   against the plan's `factorize.workspace`: the factorise phase measured 13% over its plan.
3. Equivalence: a 1B-width checkpoint (TinyLlama-1.1B's shape, 2 blocks, float32, random
   weights with decaying spectra) compressed with svdllm-a at ratio 0.4 on CUDA and on the
   CPU, closed form, refined and with 4-bit factors: the ranks must agree, and the logit
   error of each output against the original model says whether both devices compress
   equally well. (On random weights near-tied singular values make the truncation
   ill-determined, so the two outputs are not compared value for value; refinement's steps
   and GPTQ's rounding decisions differ in rounding too.)

Each run is its own `streamsvd compress` process, stopped after --timeout seconds (then
recorded as unfinished); its log goes to DIR/gpu_check.log. Writes gpu_check.json and
gpu_check.md into DIR after every step, so a run cut short still reports what it did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvd.synth import synthesize  # noqa: E402

MiB = 2**20


def compress(
    model: Path, out: Path, device: str, *extra: str, timeout: float, log: Path
) -> tuple[dict, dict | None, float]:
    """(plan, summary, wall seconds) of one run; summary None where it ran past `timeout`."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.work", ignore_errors=True)
    cli = [
        sys.executable,
        "-m",
        "streamsvd.cli",
        "-q",
        "compress",
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        device,
        *extra,
    ]
    plan_json, summary_json = out.parent / f"{out.name}.plan.json", out.parent / f"{out.name}.json"
    subprocess.run(
        [*cli, "--dry-run", "--summary-json", str(plan_json)], check=True, capture_output=True
    )
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cli)}\n")
        f.flush()
        try:
            subprocess.run(
                [*cli, "--summary-json", str(summary_json)], check=True, stdout=f, stderr=f,
                timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            f.write(f"stopped after {timeout} s\n")
            return json.loads(plan_json.read_text()), None, time.perf_counter() - start
    wall = time.perf_counter() - start
    return json.loads(plan_json.read_text()), json.loads(summary_json.read_text()), wall


def logit_error(original: Path, compressed: Path, device: str) -> float:
    """‖logits − original logits‖ / ‖original logits‖ on 4 fixed random windows."""
    from transformers import AutoModelForCausalLM

    from streamsvd import load_compressed

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).to(device)
        vocab = ref.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        want = ref(ids).logits.double()
        del ref
        got = load_compressed(compressed, device).float()(ids).logits.double()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


# Llama-2-7B's linears by input group: (names and out_features, in_features)
SHAPES_7B = [
    ({"q_proj": 4096, "k_proj": 4096, "v_proj": 4096}, 4096),
    ({"o_proj": 4096}, 4096),
    ({"gate_proj": 11008, "up_proj": 11008}, 4096),
    ({"down_proj": 4096}, 11008),
]


def factorise_probe(
    device: str, shapes=SHAPES_7B, ratio: float = 0.2, tokens: int = 32768
) -> list[dict]:
    """Device bytes svdllm-a allocates beyond W and its group's sums, linear by linear,
    against the plan's workspace (float64 values). On a CPU: resident bytes, sampled
    (`memory.phase_peak_bytes`), with glibc returning freed memory as a run does."""
    from streamsvd.factorize import METHODS, rank_for, workspace
    from streamsvd.memory import phase_peak_bytes, reset_peak, return_freed_memory
    from streamsvd.stats import InputStats, cross_as_product

    method, gen = METHODS["svdllm-a"], torch.Generator(device).manual_seed(0)
    on_gpu = device.startswith("cuda")
    return_freed_memory()
    rows = []
    for outs, n in shapes:
        weights = {
            name: torch.randn(m, n, generator=gen, device=device, dtype=torch.bfloat16)
            for name, m in outs.items()
        }
        stats = InputStats(n, method.needs, device, weights)
        for _ in range(0, tokens, 2048):
            x = torch.randn(2048, n, generator=gen, device=device, dtype=torch.bfloat16)
            stats.add(x, x + 0.1 * torch.randn_like(x))
        del x
        owns = cross_as_product(list(outs.values()), n)
        for name, m in outs.items():
            rank = rank_for(m, n, ratio)
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                reset_peak()
                base = phase_peak_bytes()
            factors = method.factorize(weights[name], stats.for_linear(name), rank)
            if on_gpu:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = phase_peak_bytes()
            measured = round((peak - base) / MiB, 1)
            rows.append(
                {
                    "linear": name,
                    "m": m,
                    "n": n,
                    "rank": rank,
                    "planned_mb": round(workspace("svdllm-a", m, n, rank, owns) * 8 / MiB, 1),
                    "measured_mb": measured,
                }
            )
            del factors
        del stats, weights
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamsvd-gpu-check"))
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run at most")
    sections = ["probe", "scale", "factorise", "equivalence"]
    parser.add_argument("--skip", nargs="*", default=[], choices=sections)
    parser.add_argument("--variants", nargs="*", help="refined, closed, 4-bit (default all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible")
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calib.txt"
    if not calib.exists():  # no data on the GPU machine: the stdlib's docstrings
        from streamsvd.calib import stdlib_docstrings

        calib.write_text(stdlib_docstrings(2_000_000))
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "scale": [],
        "equivalence": [],
        "probe": [],
        "factorise": [],
    }
    log = args.results / "gpu_check.log"
    args.results.mkdir(parents=True, exist_ok=True)
    # the defaults refine; "4-bit" is the defaults with --bits 4 (refined, then GPTQ)
    variants = {"refined (default)": [], "closed form": ["--refine-epochs", "0"],
                "4-bit": ["--bits", "4"]}  # fmt: skip

    if "probe" not in args.skip:
        from streamsvd import speed

        planned_size = speed.BENCH_N_CUDA
        try:
            for n in (1024, 2048, 4096):
                speed.BENCH_N_CUDA = n  # a GPU's probe reads min(BENCH_N_CUDA, width)
                start = time.perf_counter()
                rates = speed.measure_speed("cuda", torch.bfloat16, "svdllm-a", width=4096)
                rates["probe_seconds"] = round(time.perf_counter() - start, 2)
                result["probe"].append({"n": n, **rates})
                save(args.results, result)
        finally:  # the runs below plan with the library's own size
            speed.BENCH_N_CUDA = planned_size

    if "scale" not in args.skip:
        model = args.work / "7b"
        if not model.exists():
            synthesize(model, "7b", 2, dtype=torch.bfloat16)
        for variant, options in variants.items():
            if args.variants and variant.split()[0] not in args.variants:
                continue
            out = args.work / f"7b-{variant.split()[0]}"
            plan, summary, wall = compress(
                model, out, "cuda", "--calib", str(calib), *options, timeout=args.timeout, log=log
            )
            row = {
                "variant": variant,
                "wall_seconds": round(wall, 1),
                "finished": summary is not None,
                "plan_seconds_per_block": plan["seconds_per_block"],
                "plan_device_phases_mb": {
                    k: round(v / MiB) for k, v in plan["device_phases"].items()
                },
                "plan_host_phases_mb": {k: round(v / MiB) for k, v in plan["host_phases"].items()},
            }
            if summary is not None:
                row |= {
                    "block_seconds": summary["block_seconds"],
                    "phase_peaks": summary["phase_peaks"],
                    "peak_cuda_mb": summary.get("peak_cuda_mb"),
                    "peak_rss_mb": summary["peak_rss_mb"],
                }
            result["scale"].append(row)
            shutil.rmtree(out, ignore_errors=True)
            save(args.results, result)

    if "factorise" not in args.skip:
        result["factorise"] = factorise_probe("cuda")
        save(args.results, result)

    if "equivalence" not in args.skip:
        model = args.work / "1b"
        if not model.exists():
            synthesize(model, "1b", 2, dtype=torch.float32)
        common = [
            "--method",
            "svdllm-a",
            "--ratio",
            "0.4",
            "--nsamples",
            "16",
            "--seqlen",
            "256",
            "--calib",
            str(calib),
            "--compute-dtype",
            "float32",
            "--allow-few-tokens",  # 4,096 tokens against 1b's 5,632: equivalence, not quality
        ]
        for variant, options in variants.items():
            for device in ("cuda", "cpu"):
                out = args.work / f"1b-{device}-{variant.split()[0]}"
                _, summary, wall = compress(
                    model, out, device, *common, *options, timeout=args.timeout, log=log
                )
                if summary is None:
                    result["equivalence"].append(
                        {"device": device, "variant": variant, "finished": False}
                    )
                    save(args.results, result)
                    continue
                result["equivalence"].append(
                    {
                        "device": device,
                        "variant": variant,
                        "wall_seconds": round(wall, 1),
                        "seconds": summary["seconds"],
                        "stage_seconds": summary["stage_seconds"],
                        "logit_error": logit_error(model, out, "cuda"),
                        "peak_cuda_mb": summary.get("peak_cuda_mb"),
                        "linear_params_after": summary["linear_params_after"],
                    }
                )
                save(args.results, result)


def save(results: Path, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_check.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# The CUDA path on {result['device']} (torch {result['torch']})",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    for r in result["scale"]:
        lines += [f"## 7B width, 2 blocks, bfloat16, {r['variant']}", ""]
        planned = r["plan_seconds_per_block"] or {}
        plan_text = (
            f"{planned.get('total', 0):.1f} (refine {planned.get('refine', 0):.1f}, "
            f"quantize {planned.get('quantize', 0):.1f})"
        )
        if not r["finished"]:
            lines += [
                f"Stopped unfinished after {r['wall_seconds']} s (plan per block: {plan_text}; "
                f"planned device phases {r['plan_device_phases_mb']} MiB).",
                "",
            ]
            continue
        lines += [
            f"Wall {r['wall_seconds']} s; peak CUDA {r['peak_cuda_mb']} MiB, peak RSS "
            f"{r['peak_rss_mb']} MiB.",
            "",
            "| phase | planned device (MiB) | measured device (MiB) | planned host (MiB) "
            "| measured host (MiB) |",
            "|---|---|---|---|---|",
        ]
        for phase, peaks in r["phase_peaks"].items():
            lines.append(
                f"| {phase} | {r['plan_device_phases_mb'].get(phase, '–')} | "
                f"{peaks.get('device_mb', '–')} | {r['plan_host_phases_mb'].get(phase, '–')} "
                f"| {peaks.get('host_mb', '–')} |"
            )
        lines += ["", "| block | measured s (by stage) | planned s per block |", "|---|---|---|"]
        for b in r["block_seconds"]:
            stages = ", ".join(f"{k} {v}" for k, v in b.items() if k not in ("block", "total"))
            lines.append(f"| {b['block']} | {b['total']} ({stages}) | {plan_text} |")
        lines.append("")
    if result["equivalence"]:
        lines += [
            "## CUDA against CPU: 1B width, 2 blocks, float32, svdllm-a 0.4, 16×256",
            "",
            "| device | variant | seconds | refine (s) | logit error vs original | "
            "peak CUDA (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["equivalence"]:
            if not r.get("finished", True):
                lines.append(f"| {r['device']} | {r['variant']} | unfinished | | | |")
                continue
            lines.append(
                f"| {r['device']} | {r['variant']} | {r['seconds']} | "
                f"{r['stage_seconds'].get('refine', 0)} | {r['logit_error']:.4f} | "
                f"{r['peak_cuda_mb'] or '–'} |"
            )
        lines.append("")
    if result.get("factorise"):
        lines += [
            "## Factorise, linear by linear: device memory beyond W and its group's sums",
            "",
            "| linear | m×n | rank | planned workspace (MiB) | measured (MiB) |",
            "|---|---|---|---|---|",
        ]
        for r in result["factorise"]:
            lines.append(
                f"| {r['linear']} | {r['m']}×{r['n']} | {r['rank']} | {r['planned_mb']} | "
                f"{r['measured_mb']} |"
            )
        lines.append("")
    if result["probe"]:
        keys = [k for k in result["probe"][0] if k not in ("n", "device_name", "itemsize")]
        lines += [
            "## The speed probe's rates by its size (flop/s; eigh_k3 seconds per k³)",
            "",
            "| n | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for r in result["probe"]:
            lines.append(f"| {r['n']} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
        lines.append("")
    (results / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
