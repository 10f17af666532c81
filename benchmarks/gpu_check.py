"""The GPU acceptance check, as one prepared script for a lent GPU (a session gets about
15 minutes of one; benchmarks/gpu_run.sh runs this there): the compress defaults on 7B-
and 70B-width synthetic checkpoints, timed by stage and measured against the plan, the
whole model projected from them, CUDA against the CPU path, and whether vLLM serves an
output.

    python benchmarks/gpu_check.py --results DIR    # on the GPU machine; DIR: its $OUT
    python benchmarks/gpu_check.py --dry --results DIR    # the same steps on a CPU, tiny

Steps, in order of value (each bounded by its own timeout and by what is left of
--budget; a step that no longer fits is recorded as skipped):

1. 7b: a 7B-width checkpoint (Llama-2-7B's widths, 2 blocks, bfloat16) compressed with the
   defaults (svdllm-a at 0.2, 64×512 calibration, 16 refinement epochs), `--dry-run` first:
   seconds per block by stage, the share of each block not computing (stages outside
   report.WORK_STAGES, and untimed time), device and host peaks by phase against the
   plan, and the projected whole model: seconds per block × the real depth (32) + the
   run's fixed time (everything outside the blocks: setup, calibration, the output).
2. 70b: the same as step 1 at Llama-2-70B's widths (80 blocks deep when projected).
3. 7b-bf16: step 1 with refinement in bf16 autocast (`--refine-precision bfloat16`): what
   it saves per block, against step 1's float32 refinement (its quality: docs/method.md).
4. equivalence: a 1B-width checkpoint (TinyLlama-1.1B's widths, 2 blocks, float32)
   compressed with the defaults at ratio 0.4 on CUDA and on the CPU: the ranks must agree,
   and each output's logit error against the original says whether both compress equally
   well (on random weights near-tied singular values make the truncation ill-determined,
   so the outputs are not compared value for value).
5. vllm: if vLLM is installed, whether the 7B-width output loads in its Transformers
   backend (`LLM(..., model_impl="transformers", trust_remote_code=True)`) and generates;
   "not installed" otherwise. The rules it follows: docs/models.md#vllm.
6. factorise: each linear of a 7B-width block factorised alone, the device memory it
   allocates against the plan's `factorize.workspace`.
7. probe: the speed probe's rates at 1024, 2048 and 4096 (the plan extrapolates from them).

--dry runs the same steps on the CPU with tiny widths (64 and 128 hidden, 2 blocks, 4
windows of 32 tokens, 1 epoch; "CUDA against CPU" becomes CPU against CPU, which must give
the same bytes): tests/test_gpu_check.py runs it. Each compress is its own `streamsvd
compress` process, killed at its timeout; logs go to DIR/gpu_check.log. gpu_check.json and
gpu_check.md (`--name` for other names) are rewritten after every step, so a run cut short
still reports what it did, and a compress stopped at its timeout still reports the blocks it
finished (its log lines). A step is skipped when less than MIN_SHARE of its own limit is
left: it could not finish a block.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
import torch  # noqa: E402

from streamsvd.report import WORK_STAGES  # noqa: E402
from streamsvd.synth import SHAPES, Shape, synthesize  # noqa: E402

MiB = 2**20
STEPS = ["7b", "70b", "7b-bf16", "equivalence", "vllm", "factorise", "probe"]  # by value
# each step's limit in seconds (70b: what the default budget leaves after 7b)
STEP_SECONDS = {"7b": 150, "7b-bf16": 120, "70b": 340, "equivalence": 150, "vllm": 150,
                "factorise": 60, "probe": 30}  # fmt: skip
VARIANTS = {"7b-bf16": ("7b", ["--refine-precision", "bfloat16"])}  # step: (shape, options)
MIN_SHARE = 0.4  # of a step's own limit, left in the budget, for it to start
# what the pipeline logs as each block is committed (pipeline.Compressor._compress_block)
BLOCK_LINE = re.compile(r"block (\d+)/\d+: ranks .*?, ([\d.]+)s, peak RSS")
# --dry: the same shapes' head layout at tiny widths, the real depth kept for projections
DRY_SHAPES = {
    "7b": Shape(64, 172, 4, 4, 1024, 32, 512, source="7B layout, 64 wide"),
    "70b": Shape(128, 448, 8, 1, 1024, 80, 512, source="70B layout, 128 wide"),
    "1b": Shape(64, 176, 4, 1, 1024, 22, 512, source="1B layout, 64 wide"),
}
DRY_OPTIONS = ["--nsamples", "4", "--seqlen", "32", "--refine-epochs", "1",
               "--allow-few-tokens"]  # fmt: skip


@dataclass
class Check:
    """What one invocation checks with, and what it has found so far."""

    results: Path
    work: Path
    dry: bool
    budget: float
    name: str = "gpu_check"  # of its results: NAME.json, NAME.md, NAME.log
    started: float = field(default_factory=time.perf_counter)
    result: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def log(self) -> Path:
        return self.results / f"{self.name}.log"

    def shape(self, name: str) -> Shape:
        return DRY_SHAPES[name] if self.dry else SHAPES[name]

    def options(self) -> list[str]:
        return DRY_OPTIONS if self.dry else []

    def cap(self, step: str) -> float:
        """A step's own limit; with --dry four times it, for shared CPUs (CI, a busy
        machine) where starting a process alone can take tens of seconds."""
        return STEP_SECONDS[step] * (4 if self.dry else 1)

    def timeout(self, step: str) -> float:
        """What a step may take: its own cap, within what is left of the budget; 0 when
        less than MIN_SHARE of its cap is left."""
        left = min(self.cap(step), self.budget - (time.perf_counter() - self.started))
        return left if left >= MIN_SHARE * self.cap(step) else 0.0

    def checkpoint(self, name: str, dtype: torch.dtype) -> Path:
        path = self.work / f"{name}-{'dry' if self.dry else 'full'}"
        if not path.exists():
            synthesize(path, self.shape(name), 2, dtype=dtype)
        return path

    def calib(self) -> Path:
        path = self.work / "calib.txt"
        if not path.exists():  # no data on the GPU machine: the stdlib's docstrings
            from streamsvd.calib import stdlib_docstrings

            path.write_text(stdlib_docstrings(100_000 if self.dry else 2_000_000))
        return path


def compress(model: Path, out: Path, device: str, *extra: str, timeout: float, log: Path,
             plan: bool = True) -> tuple[dict | None, dict | None, float, str]:  # fmt: skip
    """(plan, summary, wall seconds of the run itself: its process start, setup and output
    included, what stopped it) of one `streamsvd compress`, `--dry-run` first if asked for
    a plan; the summary None where it failed or the two passed `timeout`."""
    cli = [sys.executable, "-m", "streamsvd.cli", "compress", "--model", str(model),
           "--out", str(out), "--device", device, *extra]  # fmt: skip
    plan_json, summary_json = out.parent / f"{out.name}.plan.json", out.parent / f"{out.name}.json"
    for stale in (out, Path(f"{out}.work"), plan_json, summary_json):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(True)
    deadline = time.perf_counter() + timeout
    run_start, stopped = time.perf_counter(), ""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cli)}\n")
        f.flush()
        try:
            if plan:
                subprocess.run([*cli, "--dry-run", "--summary-json", str(plan_json)],
                               check=True, stdout=f, stderr=f, timeout=timeout)  # fmt: skip
            run_start = time.perf_counter()
            subprocess.run([*cli, "--summary-json", str(summary_json)], check=True, stdout=f,
                           stderr=f, timeout=max(deadline - run_start, 1))  # fmt: skip
        except subprocess.TimeoutExpired:
            stopped = f"stopped unfinished after {timeout:.0f} s"
        except subprocess.CalledProcessError as exc:
            stopped = f"failed with exit status {exc.returncode} (see the log)"
        f.write(f"{stopped}\n" if stopped else "")
    wall = time.perf_counter() - run_start
    return _read(plan_json if plan else None), _read(summary_json), wall, stopped


def _read(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def projection(summary: dict, wall: float, depth: int) -> dict:
    """The whole model from a short run: seconds per block (their mean) × `depth` + the
    run's fixed time (all its `wall` spent outside the blocks: process start, setup,
    calibration, the output); and how much of a block was not computing (stages outside
    WORK_STAGES, and time no stage claimed)."""
    blocks = summary["block_seconds"]
    per_block = sum(b["total"] for b in blocks) / len(blocks)
    fixed = max(0.0, wall - sum(b["total"] for b in blocks))
    idle = []
    for b in blocks:
        stages = {k: v for k, v in b.items() if k not in ("block", "total")}
        untimed = max(0.0, b["total"] - sum(stages.values()))
        other = sum(v for k, v in stages.items() if k not in WORK_STAGES)
        idle.append((other + untimed) / b["total"] if b["total"] else 0.0)
    return {
        "depth": depth,
        "seconds_per_block": round(per_block, 2),
        "fixed_seconds": round(fixed, 2),
        "projected_seconds": round(per_block * depth + fixed, 1),
        "non_compute_share": round(max(idle), 4),  # the worst block's
    }


def scale_step(check: Check, step: str) -> dict:
    """Step 1, 2 or 3: the defaults (with a variant's options) at a shape's widths, 2
    blocks, bfloat16, against the plan."""
    timeout = check.timeout(step)
    name, variant = VARIANTS.get(step, (step, []))
    row = {"shape": name, "widths": _widths(check.shape(name)), "finished": False,
           **({"variant": " ".join(variant)} if variant else {})}  # fmt: skip
    if timeout <= 0:
        return row | {"skipped": "out of budget"}
    start = time.perf_counter()
    model = check.checkpoint(name, torch.bfloat16)
    row["synthesize_seconds"] = round(time.perf_counter() - start, 1)
    timeout -= time.perf_counter() - start
    out = check.work / f"{step}-out"
    log_start = check.log.stat().st_size if check.log.exists() else 0
    plan, summary, wall, stopped = compress(model, out, check.device, "--calib",
                                            str(check.calib()), *check.options(), *variant,
                                            timeout=timeout, log=check.log)  # fmt: skip
    row["wall_seconds"] = round(wall, 1)
    if stopped:
        row["stopped"] = stopped
    if plan is not None:
        row["plan"] = {
            "seconds_per_block": plan["seconds_per_block"],
            "device_phases_mb": {k: round(v / MiB) for k, v in plan["device_phases"].items()},
            "host_phases_mb": {k: round(v / MiB) for k, v in plan["host_phases"].items()},
        }
    if summary is None:
        return row | finished_blocks(check.log, log_start, check.shape(name).layers)
    row |= {
        "finished": True,
        "block_seconds": summary["block_seconds"],
        "phase_peaks": summary["phase_peaks"],
        "peak_cuda_mb": summary.get("peak_cuda_mb"),
        "peak_rss_mb": summary["peak_rss_mb"],
        "projection": projection(summary, wall, check.shape(name).layers),
        "output": str(out),
    }
    planned = (plan or {}).get("seconds_per_block") or {}
    if planned.get("total"):
        row["projection"]["planned_seconds"] = round(planned["total"] * check.shape(name).layers)
    return row


def finished_blocks(log: Path, start: int, depth: int) -> dict:
    """What a compress stopped before its end still tells: the seconds of each block it
    finished, from its log lines (after byte `start` of the log), and the blocks of a model
    `depth` deep projected from them (its fixed time unknown)."""
    text = log.read_bytes()[start:].decode(errors="replace") if log.exists() else ""
    seconds = [float(m.group(2)) for m in BLOCK_LINE.finditer(text)]
    if not seconds:
        return {}
    per_block = sum(seconds) / len(seconds)
    return {"logged_block_seconds": seconds,
            "projected_block_seconds": round(per_block * depth, 1)}  # fmt: skip


def _round(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f}"


def _widths(shape: Shape) -> str:
    return f"hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.heads} heads"


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


def equivalence_step(check: Check) -> list[dict]:
    """Step 3: the defaults at ratio 0.4 on the accelerator and on the CPU, same checkpoint."""
    model = check.checkpoint("1b", torch.float32)
    options = ["--ratio", "0.4", "--calib", str(check.calib()), "--compute-dtype", "float32",
              *(check.options() or ["--nsamples", "16", "--seqlen", "256",
                                    "--allow-few-tokens"])]  # fmt: skip
    rows = []
    for k, device in enumerate((check.device, "cpu")):
        timeout = check.timeout("equivalence") / (2 - k)  # half now, the rest for the CPU
        if timeout <= 0:
            rows.append({"device": device, "finished": False, "skipped": "out of budget"})
            continue
        out = check.work / f"1b-out-{k}"
        _, summary, wall, stopped = compress(model, out, device, *options, timeout=timeout,
                                             log=check.log, plan=False)  # fmt: skip
        if summary is None:
            rows.append({"device": device, "finished": False, "stopped": stopped})
            continue
        ranks = json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]
        rows.append({
            "device": device, "finished": True, "wall_seconds": round(wall, 1),
            "seconds": summary["seconds"], "stage_seconds": summary["stage_seconds"],
            "logit_error": logit_error(model, out, check.device),
            "peak_cuda_mb": summary.get("peak_cuda_mb"), "ranks": ranks,
        })  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    done = [r for r in rows if r["finished"]]
    if len(done) == 2:
        rows[1]["ranks_agree"] = done[0]["ranks"] == done[1]["ranks"]
    return rows


VLLM = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], model_impl="transformers", trust_remote_code=True,
          dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=256, enforce_eager=True)
cls = llm.apply_model(lambda model: type(model).__name__)
out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=8, temperature=0))
print("\nRESULT", json.dumps({"class": cls, "token_ids": list(out[0].outputs[0].token_ids),
                              "text": out[0].outputs[0].text}))
"""


def vllm_step(check: Check, output: str | None) -> dict:
    """Step 4: whether vLLM's Transformers backend loads a compressed output and generates."""
    if importlib.util.find_spec("vllm") is None:
        return {"status": "not installed"}
    if check.dry:
        return {"status": "installed; skipped with --dry (vLLM runs on the GPU)"}
    timeout = check.timeout("vllm")
    if output is None or timeout <= 0:
        return {"status": "skipped: " + ("no 7b output" if output is None else "out of budget")}
    try:
        env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # apply_model: a function
        done = subprocess.run([sys.executable, "-c", VLLM, output], capture_output=True,
                              text=True, timeout=timeout, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"unfinished after {timeout:.0f} s"}
    with check.log.open("a") as f:
        f.write(f"\n$ vllm ({output})\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr.strip().splitlines()[-3:]}
    return {"status": "loaded and generated", **json.loads(done.stdout.split("\nRESULT ")[-1])}


# Llama-2-7B's linears by input group: (names and out_features, in_features)
SHAPES_7B = [
    ({"q_proj": 4096, "k_proj": 4096, "v_proj": 4096}, 4096),
    ({"o_proj": 4096}, 4096),
    ({"gate_proj": 11008, "up_proj": 11008}, 4096),
    ({"down_proj": 4096}, 11008),
]
SHAPES_DRY = [({"q_proj": 64, "k_proj": 64}, 64), ({"down_proj": 64}, 172)]


def factorise_probe(device: str, shapes=SHAPES_7B, ratio: float = 0.2,
                    tokens: int = 32768) -> list[dict]:  # fmt: skip
    """Device bytes svdllm-a allocates beyond W and its group's sums, linear by linear,
    against the plan's workspace (float64 values). On a CPU: resident bytes, sampled
    (`memory.phase_peak_bytes`), with glibc returning freed memory as a run does."""
    from streamsvd.factorize import METHODS, rank_for, workspace
    from streamsvd.memory import return_freed_memory
    from streamsvd.stats import InputStats, cross_as_product

    method, gen = METHODS["svdllm-a"], torch.Generator(device).manual_seed(0)
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
            base = _peak_start(device)
            factors = method.factorize(weights[name], stats.for_linear(name), rank)
            rows.append({
                "linear": name, "m": m, "n": n, "rank": rank,
                "planned_mb": round(workspace("svdllm-a", m, n, rank, owns) * 8 / MiB, 1),
                "measured_mb": round((_peak_end(device) - base) / MiB, 1),
            })  # fmt: skip
            del factors
        del stats, weights
    return rows


def _peak_start(device: str) -> int:
    from streamsvd.memory import phase_peak_bytes, reset_peak

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak()
    return phase_peak_bytes()


def _peak_end(device: str) -> int:
    from streamsvd.memory import phase_peak_bytes

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return phase_peak_bytes()


def probe_step(check: Check) -> list[dict]:
    """Step 6: the speed probe's rates by its size (on a CPU: the dry widths' one size)."""
    from streamsvd import speed

    rows, planned_size = [], speed.BENCH_N_CUDA
    try:
        for n in (64,) if check.dry else (1024, 2048, 4096):
            speed.BENCH_N_CUDA = n  # a GPU's probe reads min(BENCH_N_CUDA, width)
            start = time.perf_counter()
            rates = speed.measure_speed(check.device, torch.bfloat16, "svdllm-a", width=max(n, 128))
            rates["probe_seconds"] = round(time.perf_counter() - start, 2)
            rows.append({"n": speed.bench_size(check.device, max(n, 128)), **rates})
    finally:  # later runs in this process plan with the library's own size
        speed.BENCH_N_CUDA = planned_size
    return rows


def run_steps(check: Check, steps: list[str]) -> None:
    """The steps in order of value; results saved after each."""
    r = check.result
    for step in STEPS:
        if step not in steps:
            continue
        if step in ("7b", "70b", *VARIANTS):
            r["scale"].append(scale_step(check, step))
        elif step == "equivalence":
            r["equivalence"] = equivalence_step(check)
        elif step == "vllm":
            outputs = [s.get("output") for s in r["scale"] if s["shape"] == "7b"
                       and "variant" not in s]  # fmt: skip
            r["vllm"] = vllm_step(check, outputs[0] if outputs else None)
        elif check.timeout(step) < check.cap(step):  # in this process: cannot be stopped
            r[step] = {"skipped": "out of budget"}
        elif step == "factorise":
            r[step] = factorise_probe(check.device, *((SHAPES_DRY, 0.2, 4096) if check.dry else ()))
        else:
            r[step] = probe_step(check)
        r["seconds"] = round(time.perf_counter() - check.started, 1)
        common.save(check.results, check.name, r, markdown(r))
    for row in r["scale"]:  # the outputs are large; kept until the vLLM step has run
        shutil.rmtree(row.get("output", ""), ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=common.ROOT / "benchmarks/results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamsvd-gpu-check"))
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds for all steps together (default 450: the 7b and 70b "
                             "steps, in a 540 s command; gpu_run.sh)")  # fmt: skip
    parser.add_argument("--name", default="gpu_check",
                        help="the results' file names: NAME.json, NAME.md, NAME.log")  # fmt: skip
    parser.add_argument("--steps", nargs="*", default=STEPS, choices=STEPS)
    parser.add_argument("--dry", action="store_true",
                        help="on the CPU at tiny widths: the script's own check")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (--dry runs it on the CPU)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    budget = args.budget * (4 if args.dry else 1)
    check = Check(args.results, args.work, args.dry, budget, args.name)
    check.result = {
        "device": "CPU (dry run)" if args.dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dry": args.dry,
        "command": common.command_line("gpu_check.py", argv),
        "budget_seconds": args.budget,
        "scale": [],
    }
    run_steps(check, args.steps)
    return check.result


def markdown(result: dict) -> str:
    """gpu_check.md: one section per step."""
    lines = [
        f"# The GPU check on {result['device']} (torch {result['torch']})",
        "",
        f"Command: `{result['command']}`; {result.get('seconds', 0)} s of a "
        f"{result['budget_seconds']:.0f} s budget.",
        "",
    ]
    for row in result["scale"]:
        lines += scale_lines(row)
    if "equivalence" in result:
        lines += equivalence_lines(result["equivalence"], result["dry"])
    if "vllm" in result:
        v = result["vllm"]
        detail = {k: x for k, x in v.items() if k != "status"}
        lines += ["## vLLM, Transformers backend", "", f"Status: {v['status']}."]
        lines += [f"`{json.dumps(detail)}`", ""] if detail else [""]
    lines += factorise_lines(result.get("factorise")) + probe_lines(result.get("probe"))
    return "\n".join(lines) + "\n"


def scale_lines(r: dict) -> list[str]:
    variant = f", `{r['variant']}`" if "variant" in r else ""
    lines = [f"## {r['shape'].upper()} width ({r['widths']}), 2 blocks, bfloat16, the "
             f"defaults{variant}", ""]  # fmt: skip
    if not r["finished"]:
        lines.append(f"Not measured: {r['skipped']}." if "skipped" in r else
                     f"Not finished: {r.get('stopped')}.")  # fmt: skip
        if "logged_block_seconds" in r:
            lines.append(f"Blocks it finished, seconds each (its log): "
                         f"{', '.join(map(str, r['logged_block_seconds']))}; the blocks of the "
                         f"whole model at that rate: {r['projected_block_seconds']} s "
                         f"(setup and output not counted).")  # fmt: skip
        return lines + [""]
    plan = r.get("plan", {})
    planned = plan.get("seconds_per_block") or {}
    lines += ["### Time per block by stage (seconds)", "",
              "| block | total | by stage | planned total |", "|---|---|---|---|"]  # fmt: skip
    for b in r["block_seconds"]:
        stages = ", ".join(f"{k} {v}" for k, v in b.items() if k not in ("block", "total"))
        lines.append(f"| {b['block']} | {b['total']} | {stages} | {_round(planned.get('total'))} |")
    lines += ["", "### Peaks against the plan (MiB)", "",
              "| phase | planned device | measured device | planned host | measured host |",
              "|---|---|---|---|---|"]  # fmt: skip
    for phase, peaks in r["phase_peaks"].items():
        lines.append(
            f"| {phase} | {plan.get('device_phases_mb', {}).get(phase, '–')} | "
            f"{peaks.get('device_mb', '–')} | {plan.get('host_phases_mb', {}).get(phase, '–')} "
            f"| {peaks.get('host_mb', '–')} |"
        )
    p = r["projection"]
    lines += [
        "",
        f"Overall peaks: device {r['peak_cuda_mb'] or '–'} MiB, host (RSS) {r['peak_rss_mb']} MiB.",
        "",
        "### Projected whole model",
        "",
        f"{p['seconds_per_block']} s per block × {p['depth']} blocks + {p['fixed_seconds']} s "
        f"fixed = **{p['projected_seconds']} s** ({p['projected_seconds'] / 60:.1f} min; "
        f"the plan: {p.get('planned_seconds', '–')} s of blocks). Not computing: "
        f"{p['non_compute_share']:.1%} of the slowest block.",
        "",
    ]
    return lines


def equivalence_lines(rows: list[dict], dry: bool) -> list[str]:
    title = "CPU against CPU (dry run)" if dry else "CUDA against CPU"
    lines = [f"## {title}: 1B layout, 2 blocks, float32, the defaults at ratio 0.4", "",
             "| device | seconds | refine (s) | logit error vs original | peak CUDA (MiB) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if not r["finished"]:
            lines.append(f"| {r['device']} | {r.get('skipped') or r.get('stopped')} | | | |")
            continue
        lines.append(f"| {r['device']} | {r['seconds']} | {r['stage_seconds'].get('refine', 0)} "
                     f"| {r['logit_error']:.6f} | {r['peak_cuda_mb'] or '–'} |")  # fmt: skip
    agree = rows[-1].get("ranks_agree") if rows else None
    lines += ["", f"Ranks agree: {'–' if agree is None else agree}.", ""]
    return lines


def factorise_lines(rows) -> list[str]:
    if not rows:
        return []
    lines = ["## Factorise, linear by linear: memory beyond W and its group's sums", ""]
    if isinstance(rows, dict):
        return lines + [f"Not measured: {rows['skipped']}.", ""]
    lines += ["| linear | m×n | rank | planned workspace (MiB) | measured (MiB) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['linear']} | {r['m']}×{r['n']} | {r['rank']} | {r['planned_mb']} | "
                     f"{r['measured_mb']} |")  # fmt: skip
    return lines + [""]


def probe_lines(rows) -> list[str]:
    if not rows:
        return []
    lines = ["## The speed probe's rates by its size (flop/s; eigh_k3 seconds per k³)", ""]
    if isinstance(rows, dict):
        return lines + [f"Not measured: {rows['skipped']}.", ""]
    keys = [k for k in rows[0] if k not in ("n", "device_name", "itemsize")]
    lines += ["| n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['n']} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
