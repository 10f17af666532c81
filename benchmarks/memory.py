"""Memory footprint and scale: streamsvd's peak memory against depth and width, the naive
way (whole model loaded with transformers, then compressed) as the baseline, and a
checkpoint larger than the memory the run is allowed.

    bash dev.sh bench-memory                  # CPU defaults: about 25 minutes on 2 cores
    .venv/bin/python benchmarks/memory.py --device cuda --method svdllm-w --ratio 0.2 \\
        --depths 4 8 16 32 --widths 7b 13b 34b 70b --width-layers 2 --demo-layers 32

Runs, each in its own process measured from outside (benchmarks/monitor.py: psutil
sampling of RSS, the kernel's ru_maxrss, workdir disk, wall time):
  depth     synthetic checkpoints of --depth-shape widths at --depths (4 depths, 8× apart),
            streamsvd and naive, each checkpoint's page cache dropped first;
  prefetch  --prefetch-layers with prefetching on and off, alternately, --prefetch-repeats
            times each, cold page cache: what overlapping I/O with compute buys;
  width     --widths at --width-layers blocks, streamsvd and naive where it fits in RAM;
  demo      a checkpoint (--demo-shape, --demo-layers; by default the deepest of the depth
            sweep, whose run is then the demo's) at least 2× larger than --allowance
            (default: the plan's estimate plus 15%), compressed under that allowance (a
            cgroup memory limit where the machine allows one, and a watchdog that kills the
            run when its RSS exceeds it), then evaluated block by block under it; the naive
            way is tried under it too.
The CPU defaults use `rsvd` (randomised SVD) at ratio 0.95: a full float64 SVD of one
4096×11008 matrix takes minutes on 2 CPU cores, and what is measured here, memory, is set
by the shapes far more than by the method's arithmetic. On a GPU give the method you use.

Writes benchmarks/results/memory.json (every measurement), memory.md (tables) and
memory_depth.png, memory_width.png, memory_demo.png, memory_time.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
import torch  # noqa: E402
from monitor import drop_page_cache, run_measured  # noqa: E402

from streamsvd.factorize import METHODS  # noqa: E402
from streamsvd.pipeline import CompressConfig  # noqa: E402
from streamsvd.plan import host_memory_available, make_plan, measure_baseline  # noqa: E402
from streamsvd.report import WORK_STAGES  # noqa: E402
from streamsvd.synth import DTYPES, SHAPES, checkpoint_bytes, synthesize  # noqa: E402

GiB = 2**30
COMMAND = " ".join([".venv/bin/python", "benchmarks/memory.py", *sys.argv[1:]])
RUN_COMPRESS = """
import json, sys
from streamsvd.memory import return_freed_memory
from streamsvd import CompressConfig, compress
return_freed_memory()  # as the CLI does
summary = compress(CompressConfig(**json.loads(sys.argv[1])))
open(sys.argv[2], "w").write(json.dumps(summary))
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--method", choices=list(METHODS), default="rsvd")
    p.add_argument("--ratio", type=float, default=0.95)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--depth-shape", choices=list(SHAPES), default="7b")
    p.add_argument("--depths", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--widths", choices=list(SHAPES), nargs="*", default=["7b", "13b", "70b"])
    p.add_argument("--width-layers", type=int, default=1)
    p.add_argument("--demo-shape", choices=list(SHAPES), default="7b")
    p.add_argument("--demo-layers", type=int, default=8)
    p.add_argument("--allowance", type=float, help="GiB (default: plan estimate + 15%%)")
    p.add_argument("--demo-windows", type=int, default=4, help="eval windows in the demo")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--prefetch-layers", type=int, default=4,
                   help="depth at which to time prefetching on and off (0: don't)")  # fmt: skip
    p.add_argument("--prefetch-repeats", type=int, default=1)
    p.add_argument("--runs", type=Path, default=common.ROOT / "benchmarks/runs/memory")
    p.add_argument("--results", type=Path, default=common.ROOT / "benchmarks/results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite memory.md and the plots from memory.json")  # fmt: skip
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the synthetic checkpoints in --runs for the next time")  # fmt: skip
    return p.parse_args()


class Bench:
    def __init__(self, args):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.runs_dir = args.runs
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.fixed: dict | None = None  # the plan's measured setup memory, once per bench
        self.made: list[Path] = []
        self.bandwidth: float | None = None  # cold read bytes/s of the largest checkpoint
        args.results.mkdir(parents=True, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self, shape: str, layers: int) -> Path:
        path = self.runs_dir / f"ckpt-{shape}-{layers}L-{self.args.dtype}"
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            start = time.perf_counter()
            synthesize(path, shape, layers, self.dtype)
            log(f"synthesized {path.name} ({dir_bytes(path) / GiB:.2f} GiB) "
                f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
            if not self.args.keep_checkpoints:
                self.made.append(path)
        return path

    # -- one run -----------------------------------------------------------------------
    def streamsvd(self, ckpt: Path, sweep: str, allowance: int | None = None,
                  prefetch: bool = True, cold: bool = True) -> dict:  # fmt: skip
        a = self.args
        out = self.runs_dir / "out"
        for stale in (out, Path(f"{out}.work"), out.with_name("out.partial")):
            shutil.rmtree(stale, ignore_errors=True)
        cfg = dict(model=str(ckpt), out=str(out), method=a.method, ratio=a.ratio,
                   nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size,
                   device=a.device, prefetch=prefetch, allow_few_tokens=True)  # fmt: skip
        plan = self.plan(cfg)
        if cold:
            drop_page_cache(ckpt)
        summary_path = self.runs_dir / "summary.json"
        summary_path.unlink(missing_ok=True)
        m = run_measured(
            [sys.executable, "-c", RUN_COMPRESS, json.dumps(cfg), str(summary_path)],
            disk=Path(f"{out}.work"),
            allowance=allowance,
        )
        row = self.row("streamsvd", sweep, ckpt, m, summary_path)
        row["prefetch"], row["cold_cache"] = prefetch, cold
        row["plan"] = {
            "host_peak": plan.host_peak_bytes,
            "device_peak": plan.device_peak_bytes,
            "host_phases": plan.host_phases,
            "output_bytes": plan.output_bytes,
            "activation_bytes": plan.disk_bytes["activations"],
            "params_after": plan.params_after,
        }
        if out.exists():
            row["output_bytes"] = dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        return self.record(row)

    def naive(self, ckpt: Path, sweep: str, allowance: int | None = None) -> dict | None:
        a = self.args
        need = 1.3 * dir_bytes(ckpt) + 2 * GiB  # the model, its factors, the temporaries
        if allowance is None and need > host_memory_available()[0]:
            log(f"naive {ckpt.name}: skipped, needs about {need / GiB:.1f} GiB")
            return None
        out = self.runs_dir / "naive-out"
        shutil.rmtree(out, ignore_errors=True)
        summary_path = self.runs_dir / "naive.json"
        summary_path.unlink(missing_ok=True)
        drop_page_cache(ckpt)
        command = [sys.executable, str(common.ROOT / "benchmarks/naive.py"), "--model", str(ckpt),
                   "--out", str(out), "--method", a.method, "--ratio", str(a.ratio),
                   "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                   "--batch-size", str(a.batch_size), "--device", a.device,
                   "--summary-json", str(summary_path)]  # fmt: skip
        m = run_measured(command, disk=out, allowance=allowance)
        shutil.rmtree(out, ignore_errors=True)
        return self.record(self.row("naive", sweep, ckpt, m, summary_path))

    def evaluate(self, ckpt: Path, allowance: int) -> dict:
        a = self.args
        command = [sys.executable, "-m", "streamsvd.cli", "-q", "eval", "--model", str(ckpt),
                   "--windows", str(a.demo_windows), "--seqlen", str(a.seqlen),
                   "--batch-size", str(a.batch_size), "--device", a.device]  # fmt: skip
        drop_page_cache(ckpt)
        m = run_measured(command, allowance=allowance)
        return self.record(self.row("streamsvd eval", "demo", ckpt, m, None))

    def plan(self, cfg: dict):
        config = CompressConfig(**cfg)
        if self.fixed is None:
            self.fixed = measure_baseline(config)
        return make_plan(config, self.fixed)

    def row(self, kind: str, sweep: str, ckpt: Path, m, summary_path: Path | None) -> dict:
        config = json.loads((ckpt / "config.json").read_text())
        summary = {}
        if summary_path is not None and summary_path.exists():
            summary = json.loads(summary_path.read_text())
        return {
            "kind": kind,
            "sweep": sweep,
            "checkpoint": ckpt.name,
            "hidden": config["hidden_size"],
            "intermediate": config["intermediate_size"],
            "layers": config["num_hidden_layers"],
            "checkpoint_bytes": dir_bytes(ckpt),
            "method": self.args.method,
            "ratio": self.args.ratio,
            "device": self.args.device,
            "ok": m.returncode == 0,
            **m.to_dict(),
            "peak_rss": max(m.peak_rss_sampled, m.ru_maxrss),
            "peak_cuda_mb": summary.get("peak_cuda_mb"),
            "seconds": summary.get("seconds"),
            "stage_seconds": summary.get("stage_seconds", {}),
            "other_seconds": summary.get("other_seconds"),
        }

    def record(self, row: dict) -> dict:
        self.results.append(row)
        status = "ok" if row["ok"] else f"FAILED rc={row['returncode']}"
        if row.get("killed_by_watchdog"):
            status += " (killed by the watchdog)"
        log(
            f"{row['kind']:<14} {row['sweep']:<8} {row['checkpoint']:<22} "
            f"peak RSS {row['peak_rss'] / GiB:6.2f} GiB  wall {row['wall_s']:7.1f}s  {status}"
        )
        if not row["ok"]:
            log("  " + row["stderr_tail"].strip().replace("\n", "\n  ")[-800:])
        self.save()
        return row

    def save(self) -> None:
        data = {"command": COMMAND, "settings": {k: str(v) for k, v in vars(self.args).items()},
                "machine": machine(), "read_bandwidth": self.bandwidth,
                "runs": self.results}  # fmt: skip
        (self.args.results / "memory.json").write_text(json.dumps(data, indent=1))

    def cleanup(self) -> None:
        for path in self.made:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    a = parse_args()
    if a.report_only:
        data = json.loads((a.results / "memory.json").read_text())
        write_report(data["runs"], a, data["read_bandwidth"], data["command"])
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    bench = Bench(a)
    started = time.perf_counter()
    bandwidth = None
    try:
        for layers in a.depths:
            ckpt = bench.checkpoint(a.depth_shape, layers)
            is_demo = (a.depth_shape, layers) == (a.demo_shape, a.demo_layers)
            # the demo's checkpoint is one of the sweep's: its run is the demo's run
            bench.streamsvd(ckpt, "depth", allowance=demo_allowance(bench) if is_demo else None)
            if not a.no_naive:
                bench.naive(ckpt, "depth")
        if a.prefetch_layers:
            ckpt = bench.checkpoint(a.depth_shape, a.prefetch_layers)
            for _ in range(a.prefetch_repeats):  # back to back, so that both see the same load
                for prefetch in (True, False):
                    bench.streamsvd(ckpt, "prefetch", prefetch=prefetch)
        for shape in a.widths:
            ckpt = bench.checkpoint(shape, a.width_layers)
            bench.streamsvd(ckpt, "width")
            if not a.no_naive:
                bench.naive(ckpt, "width")
        if a.demo_layers:
            demo(bench)
        largest = max(bench.runs_dir.glob("ckpt-*"), key=dir_bytes)
        bandwidth = bench.bandwidth = read_bandwidth(largest)
    finally:
        bench.save()
        bench.cleanup()
    write_report(bench.results, a, bandwidth)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min; "
        f"results in {a.results / 'memory.md'}")  # fmt: skip


def demo_allowance(bench: Bench) -> int:
    """--allowance, or the plan's peak estimate for the demo checkpoint plus 15%."""
    a = bench.args
    if a.allowance:
        return int(a.allowance * GiB)
    ckpt = bench.checkpoint(a.demo_shape, a.demo_layers)
    cfg = dict(model=str(ckpt), out=str(bench.runs_dir / "out"), method=a.method,
               ratio=a.ratio, nsamples=a.nsamples, seqlen=a.seqlen,
               batch_size=a.batch_size, device=a.device, allow_few_tokens=True)  # fmt: skip
    return math.ceil(bench.plan(cfg).host_peak_bytes * 1.15 / (GiB / 10)) * GiB // 10


def demo(bench: Bench) -> None:
    """A checkpoint at least twice the allowance, compressed and evaluated under it."""
    a = bench.args
    allowance = demo_allowance(bench)
    size = checkpoint_bytes(SHAPES[a.demo_shape], a.demo_layers, bench.dtype)
    ckpt = bench.checkpoint(a.demo_shape, a.demo_layers)
    if size < 2 * allowance:
        log(f"demo: checkpoint {size / GiB:.2f} GiB is less than twice the allowance "
            f"{allowance / GiB:.2f} GiB; use more --demo-layers")  # fmt: skip
    if not any(r["allowance"] and r["checkpoint"] == ckpt.name for r in bench.results):
        bench.streamsvd(ckpt, "demo", allowance=allowance)
    bench.evaluate(ckpt, allowance)
    if not a.no_naive:
        bench.naive(ckpt, "demo", allowance=allowance)


# -- report ----------------------------------------------------------------------------


def write_report(runs: list[dict], a, bandwidth: float, command: str = COMMAND) -> None:
    md = [
        "# Memory footprint and scale",
        "",
        f"`{command}`  ",
        f"{machine()}; method `{a.method}` at ratio {a.ratio}, {a.dtype} synthetic "
        f"Llama-family checkpoints (`streamsvd synth`), calibration {a.nsamples}×{a.seqlen}, "
        f"device {a.device}. Peak RSS is the larger of psutil sampling (20 ms) and the "
        "kernel's ru_maxrss of the run's process; every run is its own process.",
        "",
    ]
    md += depth_section(runs) + width_section(runs) + demo_section(runs)
    md += time_section(runs, bandwidth)
    (a.results / "memory.md").write_text("\n".join(md) + "\n")
    plots(runs, a.results)


def _by(runs, sweep, kind):
    return [r for r in runs if r["sweep"] == sweep and r["kind"] == kind]


def _naive_for(runs, row):
    return next((r for r in runs if r["kind"] == "naive" and r["sweep"] == row["sweep"]
                 and r["checkpoint"] == row["checkpoint"]), None)  # fmt: skip


def _gib(n) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def _table(rows: list[dict], runs: list[dict], key: str) -> list[str]:
    cuda = any(r["peak_cuda_mb"] for r in rows)
    head = [
        key,
        "checkpoint GiB",
        "streamsvd peak RSS GiB",
        "plan estimate GiB (error)",
        "workdir disk peak GiB",
        "wall s",
        "naive peak RSS GiB",
        "naive / streamsvd",
    ]
    if cuda:
        head += ["streamsvd peak CUDA GiB", "plan device GiB", "naive peak CUDA GiB"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]  # fmt: skip
    for r in rows:
        naive = _naive_for(runs, r)
        naive = naive if naive and naive["ok"] else {}
        n_peak = naive.get("peak_rss")
        est = r["plan"]["host_peak"]
        cells = [
            r[key], _gib(r["checkpoint_bytes"]), _gib(r["peak_rss"]),
            f"{_gib(est)} ({est / r['peak_rss'] - 1:+.0%})", _gib(r["peak_disk"]),
            f"{r['wall_s']:.0f}", _gib(n_peak),
            f"{n_peak / r['peak_rss']:.2f}×" if n_peak else "—",
        ]  # fmt: skip
        if cuda:
            mib = lambda row: row.get("peak_cuda_mb") and row["peak_cuda_mb"] * 2**20  # noqa: E731
            cells += [_gib(mib(r)), _gib(r["plan"]["device_peak"]), _gib(mib(naive))]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def depth_section(runs) -> list[str]:
    rows = _by(runs, "depth", "streamsvd")
    if not rows:
        return []
    peaks = [r["peak_rss"] for r in rows if r["ok"]]
    spread = max(peaks) / min(peaks) - 1 if peaks else float("nan")
    out = [f"## Peak memory against depth (hidden {rows[0]['hidden']}, "
           f"intermediate {rows[0]['intermediate']})", ""]  # fmt: skip
    out += _table(rows, runs, "layers")
    out += ["", f"streamsvd's peak RSS varies by {spread:.1%} across a "
            f"{max(r['layers'] for r in rows) // min(r['layers'] for r in rows)}× range "
            "of depth.", ""]  # fmt: skip
    return out


def width_section(runs) -> list[str]:
    rows = _by(runs, "width", "streamsvd")
    if not rows:
        return []
    for r in rows:
        r["width"] = f"{r['hidden']}/{r['intermediate']}"
    n = rows[0]["layers"]
    out = [f"## Peak memory against width ({n} block{'s' if n > 1 else ''})", ""]
    return out + _table(rows, runs, "width") + [""]


def demo_section(runs) -> list[str]:
    rows = [r for r in runs if r["kind"] == "streamsvd" and r["allowance"]]
    if not rows:
        return []
    r = rows[0]
    allowance = r["allowance"]
    out = ["## A checkpoint larger than the memory allowed", ""]
    cg = r["cgroup"]
    how = (f"a cgroup v{cg['version']} memory limit of {_gib(cg['limit'])} GiB and " if cg
           else "no cgroup (not permitted here), only ")  # fmt: skip
    out += [
        f"Checkpoint {r['checkpoint']}: {_gib(r['checkpoint_bytes'])} GiB, "
        f"{r['checkpoint_bytes'] / allowance:.1f}× the allowance of {_gib(allowance)} GiB, "
        f"enforced by {how}a watchdog that kills the run when its RSS exceeds it.",
        "",
        "| run | finished | peak RSS GiB | cgroup peak usage GiB | wall s |",
        "|---|---|---|---|---|",
    ]
    for row in [r, *_by(runs, "demo", "streamsvd eval"), *_by(runs, "demo", "naive")]:
        cg = row["cgroup"] or {}
        fate = (
            "yes"
            if row["ok"]
            else (
                "killed by watchdog"
                if row["killed_by_watchdog"]
                else "killed by cgroup OOM"
                if cg.get("oom_kill")
                else f"failed ({row['returncode']})"
            )
        )
        out.append(f"| {row['kind']} | {fate} | {_gib(row['peak_rss'])} | "
                   f"{_gib(cg.get('peak_usage'))} | {row['wall_s']:.0f} |")  # fmt: skip
    return out + [""]


def time_split(r) -> tuple[float, float]:
    stages = r["stage_seconds"] or {}
    work = sum(v for k, v in stages.items() if k in WORK_STAGES)
    return work, max(0.0, r["wall_s"] - work)  # the process's wall time, imports included


def time_section(runs, bandwidth: float) -> list[str]:
    rows = [r for r in runs if r["kind"] in ("streamsvd", "naive") and r["ok"] and r["seconds"]]
    if not rows:
        return []
    out = [
        "## Where the time goes",
        "",
        "Work is what any compressor must do: read the checkpoint (load), run the blocks "
        "(forward), accumulate statistics, factorise (cholesky, svd, update), write the "
        "output. Overhead is activation I/O (zarr), dtype conversions and copies (convert), "
        "and untimed time (setup, journal, idle). The read bound is the checkpoint's size "
        "over this disk's cold read bandwidth: the least time reading it once can take.",
        "",
        "| run | sweep | checkpoint | wall s | work % | overhead % | largest stages | "
        "read bound s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        work, overhead = time_split(r)
        total = work + overhead
        top = sorted(r["stage_seconds"].items(), key=lambda kv: -kv[1])[:3]
        top_s = ", ".join(f"{k} {v:.1f}s" for k, v in top)
        out.append(
            f"| {r['kind']} | {r['sweep']}{'' if r.get('prefetch', True) else ' (no prefetch)'}"
            f" | {r['checkpoint']} | {r['wall_s']:.0f} | {work / total:.0%} | "
            f"{overhead / total:.0%} | {top_s} | {r['checkpoint_bytes'] / bandwidth:.1f} |"
        )
    pre = [r for r in _by(runs, "prefetch", "streamsvd") if r["ok"]]
    on = [r["wall_s"] for r in pre if r["prefetch"]]
    off = [r["wall_s"] for r in pre if not r["prefetch"]]
    if on and off:
        mean_on, mean_off = sum(on) / len(on), sum(off) / len(off)
        runs_s = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        load = lambda flag: [r["stage_seconds"].get("load", 0) for r in pre  # noqa: E731
                             if r["prefetch"] == flag]  # fmt: skip
        out += ["", f"Prefetching the next block ({pre[0]['checkpoint']}, cold page cache, "
                f"runs alternating): wall {mean_on:.1f}s with ({runs_s(on)}), {mean_off:.1f}s "
                f"without ({runs_s(off)}): {(mean_off - mean_on) / mean_off:+.1%} saved; "
                f"the load stage (reading the blocks) took {runs_s(load(True))}s with, "
                f"{runs_s(load(False))}s without."]  # fmt: skip
    out += ["", f"Cold read bandwidth of this disk: {bandwidth / 2**20:.0f} MiB/s.", ""]
    return out


def read_bandwidth(ckpt: Path) -> float:
    """Bytes per second reading a checkpoint's files with its page cache dropped first."""
    drop_page_cache(ckpt)
    start, total = time.perf_counter(), 0
    for path in sorted(ckpt.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def plots(runs: list[dict], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for sweep, key, label in (("depth", "layers", "decoder blocks"),
                              ("width", "hidden", "hidden size")):  # fmt: skip
        rows = [r for r in _by(runs, sweep, "streamsvd") if r["ok"]]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("streamsvd", "o"), ("naive", "s")):
            pts = sorted((r[key], r["peak_rss"] / GiB) for r in _by(runs, sweep, kind) if r["ok"])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{kind} peak RSS")
        pts = sorted((r[key], r["checkpoint_bytes"] / GiB) for r in rows)
        ax.plot(*zip(*pts, strict=True), linestyle="--", color="gray", label="checkpoint size")
        pts = sorted((r[key], r["plan"]["host_peak"] / GiB) for r in rows)
        ax.plot(*zip(*pts, strict=True), linestyle=":", label="streamsvd plan estimate")
        ax.set_xlabel(label)
        ax.set_ylabel("GiB")
        ax.set_title(f"Peak memory against {sweep}")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"memory_{sweep}.png", dpi=120)
        plt.close(fig)
    demo_rows = [r for r in runs if r["allowance"] and r["timeline"]]
    if demo_rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in demo_rows:
            t, rss = zip(*r["timeline"], strict=True)
            ax.plot(t, [x / GiB for x in rss], label=r["kind"])
        ax.axhline(demo_rows[0]["allowance"] / GiB, color="red", linestyle="--",
                   label="allowance")  # fmt: skip
        ax.axhline(demo_rows[0]["checkpoint_bytes"] / GiB, color="gray", linestyle=":",
                   label="checkpoint size")  # fmt: skip
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS GiB")
        ax.set_title("Compressing a checkpoint larger than the memory allowed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / "memory_demo.png", dpi=120)
        plt.close(fig)
    rows = [r for r in runs if r["kind"] == "streamsvd" and r["ok"] and r["stage_seconds"]]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4))
        stages = sorted({k for r in rows for k in r["stage_seconds"]} | {"other"},
                        key=lambda k: (k not in WORK_STAGES, k))  # fmt: skip
        bottom = [0.0] * len(rows)
        names = [f"{r['sweep']}{'' if r['prefetch'] else ' off'}\n"
                 f"{r['checkpoint'].removeprefix('ckpt-')}" for r in rows]  # fmt: skip
        for stage in stages:
            vals = [time_split(r)[1] - sum(v for k, v in r["stage_seconds"].items()
                                           if k not in WORK_STAGES)
                    if stage == "other" else r["stage_seconds"].get(stage, 0)
                    for r in rows]  # fmt: skip
            hatch = None if stage in WORK_STAGES else "//"
            ax.bar(names, vals, bottom=bottom, label=stage, hatch=hatch)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("seconds")
        ax.set_title("streamsvd wall time by stage (hatched: overhead)")
        ax.tick_params(axis="x", labelsize=6)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(results / "memory_time.png", dpi=120)
        plt.close(fig)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def machine() -> str:
    import platform

    import psutil

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / GiB:.0f} GiB RAM"
            f"{gpu}, {platform.system()}, torch {torch.__version__}")  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    main()
