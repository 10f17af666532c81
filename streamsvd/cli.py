"""Command line: argument parsing and messages, nothing else. compress's and heal's options
are made from their settings' declarations (config.CompressConfig, heal.HealConfig); the
options several commands share are declared once, here."""

from __future__ import annotations

import os

# OpenMP threads that wait for work sleep rather than spin, unless the user chose: spinning
# threads take the cores other jobs on a shared machine are waiting for, and theirs
# (docs/reliability.md#on-a-shared-machine). libgomp reads this once, when torch loads it,
# which the imports below do; `import streamsvd` alone loads no torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__  # noqa: E402
from .activations import finish_zarr_io  # noqa: E402
from .checkpoint import locate_checkpoint  # noqa: E402
from .config import DEFAULT_METHOD, CompressConfig  # noqa: E402
from .cpus import process_threads  # noqa: E402
from .demo import DEMO_PROMPTS, DEMO_RATIO, DEMO_REFINE_EPOCHS  # noqa: E402
from .errors import (  # noqa: E402
    EXIT_INTERRUPTED,
    EXIT_RESOURCES,
    EXIT_TERMINATED,
    StreamSVDError,
    Terminated,
)
from .factorize import METHODS  # noqa: E402
from .heal import HealConfig  # noqa: E402
from .memory import return_freed_memory  # noqa: E402
from .refine import DEFAULT_EPOCHS  # noqa: E402
from .synth import DTYPES, SHAPES  # noqa: E402
from .world import DEFAULT_TIMEOUT, World  # noqa: E402

log = logging.getLogger("streamsvd")

EXAMPLES = """\
examples:
  streamsvd demo                                   # compress the bundled SmolLM2-135M, compare
  streamsvd compress --model ./Llama-2-13b-hf --out ./llama13b-svd --ratio 0.2 --device cuda
  streamsvd eval --model ./llama13b-svd --data wiki.test.txt
  streamsvd generate --model ./llama13b-svd --prompt "The capital of France is"
  streamsvd export-dense --model ./llama13b-svd --out ./llama13b-svd-dense
  streamsvd status --workdir ./llama13b-svd.work   # where an interrupted run stands

exit codes:
  0    success
  2    bad input: arguments, checkpoint, calibration text, a changed setting on resume
  3    not enough resources: memory, disk or device (a --dry-run plan that says NOT
       ENOUGH included), a full disk, device out of memory, or the run directory in use
       by another run
  4    I/O failure: a read or write failed; finished blocks are kept, rerun to resume
  130  interrupted (Ctrl-C); rerun the same command to resume
  143  stopped by SIGTERM; rerun the same command to resume
"""

# --threads, in each command's words: what the threads do there, and what a rerun keeps
THREADS_DEFAULT = (
    "default: OMP_NUM_THREADS where set, else one per core, capped by the cores this process "
    "may use: its CPU affinity and its cgroup's CPU quota"
)
THREADS_HELP = {
    "compress": "CPU threads for the blocks' work on a CPU ({default}). A resumed run keeps "
    "the count it began with, whatever is given: CPU sums round by thread count, and a "
    "resumed output is byte-identical to an uninterrupted one",
    "eval": "CPU threads for scoring on a CPU ({default})",
    "generate": "CPU threads for generating on a CPU ({default})",
    "export-dense": "CPU threads for multiplying the factors back ({default})",
    "heal": "CPU threads for training on a CPU ({default})",
    "synth": "CPU threads for drawing the random weights ({default})",
    "demo": "CPU threads for its three compressions, scoring and replies on a CPU ({default}; "
    "each compression starts afresh)",
}
# Not a setting of the command it runs: main's, and the parser's own
GLOBAL_DESTS = ("command", "quiet", "threads")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_path(arg: str | None) -> str:
    """--model (a folder or a hub id, checkpoint.locate_checkpoint), or the bundled
    SmolLM2-135M converted once to safetensors."""
    if arg:
        return locate_checkpoint(arg)
    from .default_model import default_model_path

    log.info("no --model given: using the bundled SmolLM2-135M-Instruct")
    return str(default_model_path())


def _add_model(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", help=what + " (default: the bundled SmolLM2-135M-Instruct)")


def _add_device(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help=f"{what} (default: cuda when available)")  # fmt: skip


def _add_summary_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary-json", help="also write the run summary to this JSON file")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=512,
                   help="tokens per window (default %(default)s; P1 uses 512)")  # fmt: skip
    p.add_argument("--windows", type=int, default=128,
                   help="score the first N non-overlapping windows (default %(default)s; "
                   "P1 uses 128)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per forward pass (default %(default)s)")  # fmt: skip
    _add_device(p, "where the model runs")


def _add_threads(commands: dict[str, argparse.ArgumentParser]) -> None:
    for name, command in commands.items():  # status reads files: no threads to set
        if name in THREADS_HELP:
            command.add_argument(
                "--threads",
                type=_positive_int,
                default=None,
                help=THREADS_HELP[name].format(default=THREADS_DEFAULT),
            )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_settings(p: argparse.ArgumentParser, settings: type) -> None:
    """One option per field of the dataclass `settings` that declares one (config.option),
    in the fields' order: its name, type, default and help are the field's. A field
    without a default is a required option; `device`'s default is cuda where there is one,
    as every command's."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue  # not on the command line
        flag = dict(field.metadata)
        if field.name == "device":
            _add_device(p, flag["help"])
            continue
        name = flag.pop("flag", "--" + field.name.replace("_", "-"))
        value = next(t for t in typing.get_args(hints[field.name]) or [hints[field.name]]
                     if t is not type(None))  # fmt: skip
        if field.default is dataclasses.MISSING:
            flag["required"] = True
        else:
            flag["default"] = field.default
        if value is bool:
            off = field.default is False
            flag.setdefault("action", "store_true" if off else argparse.BooleanOptionalAction)
        elif value is not str:
            flag.setdefault("type", value)
        p.add_argument(name, dest=field.name, **flag)


def _settings(args: argparse.Namespace, settings: type, **resolved):
    """The dataclass `settings` of the options parsed into `args` (_add_settings), with
    `resolved`'s values in place of theirs."""
    fields = dataclasses.fields(settings)
    values = {f.name: getattr(args, f.name) for f in fields if "help" in f.metadata}
    return settings(**{**values, **resolved})


def _command_options(args: argparse.Namespace) -> dict:
    """The options parsed into `args` that belong to its command, by name."""
    return {k: v for k, v in vars(args).items() if k not in GLOBAL_DESTS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsvd",
        description="Compress large language models with SVD-LLM, one decoder block at a time, "
        "so memory stays at one block whatever the depth.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamsvd {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_compress, _add_eval, _add_generate, _add_status, _add_synth,
                _add_export_dense, _add_heal, _add_demo):  # fmt: skip
        add(sub)
    _add_threads(sub.choices)
    return parser


def _add_compress(sub) -> None:
    c = sub.add_parser("compress", help="compress a safetensors checkpoint",
                       description="Compress every linear layer of every decoder block to rank "
                       "floor((1-ratio)·m·n/(m+n)). Interrupted runs resume when the same "
                       "command is run again.")  # fmt: skip
    _add_settings(c, CompressConfig)
    _add_summary_json(c)
    c.add_argument("--dry-run", action="store_true",
                   help="print the plan instead of running: ranks, parameters, output size, "
                   "activation disk, expected peak host/device memory, estimated time per "
                   "block and in total (from a few-second micro-benchmark of the device), "
                   "and whether this machine has enough")  # fmt: skip
    c.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="launched by torchrun or accelerate launch: how long a process waits "
                   "for the others before failing with a message naming the step (default "
                   "%(default).0f); docs/distributed.md")  # fmt: skip
    c.add_argument("--processes", type=int, default=None, metavar="N",
                   help="with --dry-run: plan for N processes, each with its share of the "
                   "windows (default: WORLD_SIZE as torchrun sets it, else 1)")  # fmt: skip
    c.add_argument("--device-memory", type=float, metavar="GIB",
                   help="with --dry-run --device cuda on a machine without the GPU (a login "
                   "node): the GPU's memory in GiB to check the plan against")  # fmt: skip


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, block by block from disk",
                       description="Perplexity of a plain or streamsvd checkpoint: the first "
                       "--windows non-overlapping windows of --seqlen tokens of --data, each "
                       "scored on its own (protocol P1 with the defaults and WikiText-2 "
                       "test.txt).")  # fmt: skip
    _add_model(e, "checkpoint folder or hub id, plain or compressed")
    e.add_argument("--data", help="text file to score (default: Python's help topics, offline)")
    _add_eval_options(e)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="greedy generation from a checkpoint",
                       description="Greedy (deterministic) generation from a plain or "
                       "compressed checkpoint: an instruct model answers the prompt as a "
                       "user message through its chat template, a base model continues "
                       "it.")  # fmt: skip
    _add_model(g, "checkpoint folder or hub id, plain or compressed")
    g.add_argument("--prompt", required=True, help="the question, or the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=40,
                   help="tokens to generate (default %(default)s)")  # fmt: skip
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send the prompt through the tokenizer's chat template (default: "
                   "when the tokenizer has one; --no-chat continues the raw text)")  # fmt: skip
    _add_device(g, "where the model runs")


def _add_status(sub) -> None:
    st = sub.add_parser("status", help="where an interrupted or running compress run stands",
                        description="Where a compress run stands, read from its run "
                        "directory: blocks done, the next one, disk used, its settings, "
                        "whether it is running now, and the error that stopped it if one "
                        "did. Reads only; safe while the run goes on.")  # fmt: skip
    st.add_argument("--workdir", required=True, help="the run directory (compress's OUT.work)")


def _add_synth(sub) -> None:
    sy = sub.add_parser("synth", help="write a random checkpoint of a real shape (dense or MoE)",
                        description="A checkpoint of a named shape and any depth with random "
                        "weights of decaying spectra, written tensor by tensor (memory stays "
                        "small whatever its size): for measuring memory and time at scale. "
                        "Shapes: " + ", ".join(f"{k} ({v.source})" for k, v in SHAPES.items())
                        )  # fmt: skip
    sy.add_argument(
        "--shape",
        choices=list(SHAPES),
        required=True,
        help="the model whose shapes to write (sources: the description above)",
    )
    sy.add_argument("--layers", type=int, help="decoder blocks (default: the real model's)")
    sy.add_argument("--out", required=True, help="output directory (must not exist yet)")
    sy.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                    help="weights' dtype (default %(default)s)")  # fmt: skip
    sy.add_argument("--seed", type=int, default=0,
                    help="seed for the random weights (default %(default)s)")  # fmt: skip
    sy.add_argument("--max-shard-size", type=float, default=2.0,
                    help="GiB (default %(default)g)")  # fmt: skip
    sy.add_argument("--shape-only", action="store_true",
                    help="write the shapes with all-zero weights in sparse files (no disk, "
                    "instant): enough to plan a run with compress --dry-run")  # fmt: skip


def _add_export_dense(sub) -> None:
    x = sub.add_parser("export-dense", help="write a compressed checkpoint as plain W = A·B",
                       description="Write a compressed checkpoint as a plain one (each "
                       "factor pair multiplied back to W = A·B): the original's size, but "
                       "loadable by any tool without the low-rank modeling code.")  # fmt: skip
    x.add_argument("--model", required=True, help="streamsvd compressed checkpoint")
    x.add_argument("--out", required=True, help="output directory")


def _add_heal(sub) -> None:
    h = sub.add_parser("heal", help="LoRA fine-tuning of a low-rank output, merged into it",
                       description="Heal a compressed model as the SVD-LLM code does after "
                       "compression: LoRA (peft) on every low-rank factor, trained on text as a "
                       "causal LM, then merged into the factors. The output has the same ranks "
                       "and loads like any streamsvd output. The whole model is in memory "
                       "(gradient checkpointing); its bytes are logged first.")  # fmt: skip
    _add_settings(h, HealConfig)
    _add_summary_json(h)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="compress the bundled SmolLM2-135M and compare",
                       description="Compress SmolLM2-135M at --ratio with plain SVD, with "
                       "--method's closed form and with it refined block by block, then print "
                       "the perplexity of the original and of each (a short variant of P1 "
                       "unless given more windows) and each one's reply to --prompt.")  # fmt: skip
    d.add_argument(
        "--ratio",
        type=float,
        default=DEMO_RATIO,
        help="fraction of each linear's parameters removed (default %(default)s)",
    )
    d.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                   help="the calibrated method shown beside plain SVD (default "
                   "%(default)s)")  # fmt: skip
    d.add_argument(
        "--refine-epochs",
        type=int,
        default=DEMO_REFINE_EPOCHS,
        metavar="N",
        help="block refinement's epochs in the refined run (default %(default)s, to "
        f"keep the demo short; compress refines {DEFAULT_EPOCHS} by default)",
    )
    d.add_argument("--calib", help="calibration text (default: Python docstrings, offline, "
                   "each as a chat answer when the model has a chat template)")  # fmt: skip
    d.add_argument("--data", help="evaluation text (default: Python's help topics, offline)")
    d.add_argument("--nsamples", type=int, default=64,
                   help="calibration windows of --seqlen tokens (default %(default)s)")  # fmt: skip
    d.add_argument("--out", default="streamsvd-demo",
                   help="output directory, replaced if there (default %(default)s)")  # fmt: skip
    d.add_argument("--prompt", nargs="+", default=DEMO_PROMPTS, metavar="PROMPT",
                   help="what each model is asked (default: three short questions)")  # fmt: skip
    _add_eval_options(d)
    d.set_defaults(windows=16, seqlen=256)


def cmd_compress(args) -> dict:
    from .run import compress

    cfg = _settings(args, CompressConfig, model=locate_checkpoint(args.model),
                    device=args.device or _default_device())  # fmt: skip
    if args.dry_run:
        return _dry_run(cfg, args)
    world = World.from_env(cfg.device, args.dist_timeout)
    try:
        summary = compress(cfg, world)
    finally:
        world.close()
    if not world.writer:  # rank 0 prints and writes the run's summary
        return summary
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return summary


def _dry_run(cfg: CompressConfig, args) -> dict:
    from .plan import format_plan, make_plan

    if int(os.environ.get("RANK", "0")):  # launched by torchrun: rank 0 plans
        return {"ok": True}
    memory = None if args.device_memory is None else int(args.device_memory * 2**30)
    processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    plan = make_plan(cfg, device_memory=memory, processes=processes)
    print(format_plan(plan))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(plan.to_dict(), indent=2))
    return {**plan.to_dict(), "ok": plan.ok}


def format_summary(s: dict) -> str:
    quant = s.get("quantization")
    bits = (f", factors in {quant['bits']} bits (groups of {quant['group_size']}, "
            f"{'symmetric' if quant['symmetric'] else 'asymmetric'})" if quant else "")  # fmt: skip
    sessions = s.get("sessions", 1)
    across = (f" ({s['seconds_all_sessions']:.1f}s across {sessions} sessions, each earlier "
              "one's up to its last finished block)" if sessions > 1 else "")  # fmt: skip
    lines = [
        f"compressed with {s['method']} at ratio {s['ratio']}{bits} in {s['seconds']:.1f}s"
        + across,
        f"  parameters   {s['params_before']:,} -> {s['params_after']:,} "
        f"({s['params_after'] / s['params_before']:.1%})",
        f"  linear params {s['linear_params_before']:,} -> {s['linear_params_after']:,} "
        f"({s['linear_params_after'] / s['linear_params_before']:.1%})",
        f"  size on disk {s['size_on_disk_bytes'] / 2**20:,.1f} MiB",
        f"  peak RSS     {s['peak_rss_mb']:,.0f} MiB"
        + (f", peak CUDA {s['peak_cuda_mb']:,.0f} MiB" if "peak_cuda_mb" in s else ""),
        "  time by stage " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()),
    ]
    rescues = s.get("numerical_rescues")
    if rescues and (rescues["damped"] or rescues["dead_channels"]):
        levels = ", ".join(f"{n} at {level}" for level, n in rescues["damped"].items())
        lines.append(f"  rescues      Cholesky damping of {sum(rescues['damped'].values())} "
                     f"Grams (× mean diagonal: {levels or 'none'}), "
                     f"{len(rescues['escalated'])} past the routine level; "
                     f"{rescues['dead_channels']} dead input channels")  # fmt: skip
    if "low_rank_share" in s:
        kept = ", ".join(n.split(".*.", 1)[-1] for n in s["left_dense"]) or "nothing"
        lines.insert(3, f"  low-rank     {s['low_rank_share']:.1%} of the blocks' parameters; "
                        f"left as they were: {kept}")  # fmt: skip
    if "expert_tokens" in s:
        counts = list(s["expert_tokens"].values())
        idle = s["experts_without_tokens"]
        lines.insert(4, f"  experts      {len(counts)}, calibration tokens routed to each: "
                        f"min {min(counts)}, max {max(counts)}; {len(idle)} got none (plain "
                        "SVD)" + (f": {', '.join(idle[:3])}{' ...' * (len(idle) > 3)}" if idle
                                  else ""))  # fmt: skip
    if s.get("compute_dtype", s.get("dtype")) != s.get("dtype"):
        lines.insert(1, f"  blocks ran in {s['compute_dtype']}; the output is {s['dtype']}")
    if "other_seconds" in s:
        from .report import WORK_STAGES

        stages = s["stage_seconds"]
        work = sum(v for k, v in stages.items() if k in WORK_STAGES)
        overhead = {k: v for k, v in stages.items() if k not in WORK_STAGES}
        overhead["other"] = s["other_seconds"]
        total = max(work + sum(overhead.values()), 1e-9)
        lines.append(
            f"  work {work:.1f}s ({work / total:.0%}: {', '.join(WORK_STAGES)}), overhead "
            f"{total - work:.1f}s ({(total - work) / total:.0%}: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in overhead.items())
            + ")"
        )
    if "out" in s:  # last, where a reader of the log looks for it
        lines.append(f"  output       {s['out']}")
    return "\n".join(lines)


def cmd_eval(args) -> float:
    from .evaluate import perplexity, text_windows

    model = _model_path(args.model)
    win = text_windows(model, args.data, args.seqlen, args.windows)
    start = time.perf_counter()
    ppl = perplexity(model, win, args.batch_size, args.device or _default_device())
    print(f"perplexity {ppl:.3f} over {win.shape[0]} windows of {win.shape[1]} tokens "
          f"({time.perf_counter() - start:.1f}s)")  # fmt: skip
    return ppl


def cmd_generate(args) -> str:
    from .evaluate import generate, load_any
    from .model import load_tokenizer

    model = _model_path(args.model)
    tokenizer = load_tokenizer(model)
    chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if chat and not tokenizer.chat_template:
        raise StreamSVDError(f"--chat: the tokenizer of {model} has no chat template")
    text = generate(load_any(model, args.device or _default_device()), tokenizer, args.prompt,
                    args.max_new_tokens, chat=chat)  # fmt: skip
    print(text if chat else args.prompt + text)
    return text


def cmd_status(args) -> dict:
    from .journal import run_status

    s = run_status(Path(args.workdir))
    total, done = s["blocks_total"], s["blocks_done"]
    if s["next_block"] is not None:
        where = f"next: block {s['next_block'] + 1}/{total}"
    else:
        where = "output being assembled" if s["rest_done"] else "embedding/head shard next"
    lines = [
        f"run directory {s['workdir']}",
        f"  {'blocks done':<18} {done}/{total} ({where})",
        f"  {'disk used':<18} {s['disk_used_bytes'] / 2**20:,.1f} MiB",
        f"  {'model':<18} {s['model_shards']} shards (fingerprint in manifest.json)",
    ]
    for key, value in s["settings"].items():
        lines.append(f"  {key:<18} {json.dumps(value) if isinstance(value, dict) else value}")
    live = s["running"]
    running = f"yes, pid {live['pid']} since {live['since']}" if live else "no"
    lines.insert(1, f"  {'running now':<18} {running}")
    error = s["last_error"]
    last = f"{error['time']}: {error['error']}" if error else "none"
    lines.append(f"  {'last error':<18} {last}")
    print("\n".join(lines))
    return s


def cmd_synth(args) -> Path:
    from .synth import synth_command

    return synth_command(**_command_options(args))


def cmd_export_dense(args) -> None:
    from .lowrank import export_dense

    if Path(args.out).exists():
        raise StreamSVDError(f"output {args.out} already exists; remove it or choose another")
    print(f"wrote {export_dense(locate_checkpoint(args.model), args.out)}")


def cmd_heal(args) -> dict:
    from .heal import heal

    summary = heal(_settings(args, HealConfig, model=locate_checkpoint(args.model),
                             device=args.device or _default_device()))  # fmt: skip
    print(f"healed in {summary['seconds']:.0f}s, {summary['steps']} steps, loss "
          f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; "
          f"wrote {args.out}")  # fmt: skip
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return summary


def cmd_demo(args) -> None:
    from .demo import demo

    demo(**{**_command_options(args), "device": args.device or _default_device()})


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "export-dense": cmd_export_dense,
    "heal": cmd_heal,
    "status": cmd_status,
    "synth": cmd_synth,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 alone reports progress
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return_freed_memory()  # peak RSS = what is alive (see memory.py)
    import torch

    threads = torch.get_num_threads()  # OMP_NUM_THREADS where set, else one per core
    torch.set_num_threads(getattr(args, "threads", None) or process_threads(threads))
    try:
        with _sigterm_raises(), _logs_above_bars():
            result = COMMANDS[args.command](args)
        if args.command == "compress" and args.dry_run and not result["ok"]:
            return EXIT_RESOURCES  # the plan says NOT ENOUGH
    except StreamSVDError as exc:
        print(f"streamsvd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        return _stopped(args.command, exc)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in this process
    return 0


@contextlib.contextmanager
def _logs_above_bars():
    """For the command's duration, log lines to the console go through tqdm.write, which
    clears a live progress bar, prints the line and draws the bar again below it: else the
    line lands on the bar's own line. Nothing changes where the console gets no log lines
    (a caller that configured logging its own way)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    console = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler)
               and h.stream in (sys.stdout, sys.stderr)]  # fmt: skip
    with logging_redirect_tqdm() if console else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _sigterm_raises():
    """For the command's duration, SIGTERM raises Terminated wherever the command is, as
    Ctrl-C raises KeyboardInterrupt: the run records why it stopped and unwinds the same
    way. (Only the main thread may set a signal handler.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(command: str, exc: KeyboardInterrupt) -> int:
    """One line for a command stopped by Ctrl-C or SIGTERM, once zarr's I/O thread has
    finished what it had in flight (else it warns and raises at exit); the exit code a
    shell gives for that signal."""
    try:
        finish_zarr_io()
    except KeyboardInterrupt:
        pass  # pressed again: leave now
    terminated = isinstance(exc, Terminated)
    kept = "; finished blocks are kept: rerun the same command to resume"
    print(f"streamsvd: {'stopped by SIGTERM' if terminated else 'interrupted'}"
          f"{kept if command == 'compress' else ''}", file=sys.stderr)  # fmt: skip
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
