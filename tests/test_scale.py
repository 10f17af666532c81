"""Scale tools: synthetic checkpoints, the plan against a real run, streamed evaluation,
and the pieces of the time breakdown and of prefetching."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.checkpoint import CheckpointReader, data_ranges
from streamsvd.evaluate import perplexity
from streamsvd.factorize import plain_svd, randomized_svd, rank_for
from streamsvd.journal import disk_used
from streamsvd.model import compute_dtype
from streamsvd.plan import make_plan
from streamsvd.report import StageTimer
from streamsvd.synth import SHAPES, Shape, checkpoint_bytes, synthesize

# Wide enough that one block's statistics and factorisation temporaries are a third of the
# peak next to the interpreter's fixed ~0.5 GiB, small enough for seconds on a CPU.
PLAN_SHAPE = Shape(512, 1536, 8, 2, 2048, 2, 256)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    """The tiny shape (GQA, untied head), bf16, in shards of ~100 KB: blocks span shards."""
    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny", 2,
                      max_shard_bytes=100_000)  # fmt: skip


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return reader.tensors(list(reader))


# -- synth -----------------------------------------------------------------------------


def test_synth_moe_shape_has_the_size_and_experts_it_says(tmp_path):
    """A mixture-of-experts shape: one 2-D weight per expert, under names streamsvd reads
    as they are, and the size checkpoint_bytes predicts."""
    from streamsvd.model import build_skeleton, find_blocks, load_config
    from streamsvd.names import ModelTensors

    shape = SHAPES["tiny-moe"]
    path = synthesize(tmp_path / "moe", "tiny-moe", 2, values=False)
    files = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert files == pytest.approx(checkpoint_bytes(shape, 2), rel=0.01)
    reader = CheckpointReader(path)
    model = build_skeleton(load_config(path), reader.dtype())
    prefix, _ = find_blocks(model)
    tensors = ModelTensors(reader, model)
    tensors.check_blocks(prefix)  # every block parameter comes from the checkpoint
    assert not tensors.unused
    experts = {n.split(".experts.")[1].split(".")[0] for n in tensors.under(f"{prefix}.0")
               if ".experts." in n}  # fmt: skip
    assert len(experts) == shape.experts


def test_synth_writes_a_sharded_checkpoint_that_transformers_loads(tiny_synth):
    shape = SHAPES["tiny"]
    index = json.loads((tiny_synth / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    block0 = {s for n, s in index["weight_map"].items() if n.startswith("model.layers.0.")}
    assert len(block0) > 1  # a block split across shards, as real checkpoints have them
    config = json.loads((tiny_synth / "config.json").read_text())
    assert (config["num_key_value_heads"], config["dtype"]) == (shape.kv_heads, "bfloat16")
    assert sum((tiny_synth / s).stat().st_size for s in shards) == pytest.approx(
        checkpoint_bytes(shape, 2), rel=0.01
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_synth, dtype=torch.bfloat16)
    written = tensors_of(tiny_synth)
    state = model.state_dict()
    assert set(written) == set(state)
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 128)  # GQA
    assert torch.all(written["model.norm.weight"] == 1)


def test_synth_block_linears_have_decaying_spectra(tiny_synth):
    W = tensors_of(tiny_synth)["model.layers.1.mlp.down_proj.weight"].float()  # (128, 344)
    s = torch.linalg.svdvals(W)
    top = (s[: len(s) // 8] ** 2).sum() / (s**2).sum()
    gaussian = torch.linalg.svdvals(torch.randn_like(W))
    gaussian_top = (gaussian[: len(s) // 8] ** 2).sum() / (gaussian**2).sum()
    assert top > 0.5 > gaussian_top + 0.2  # half the energy in an eighth of the directions
    assert s[0] > 10 * s[-1]
    assert W.std() == pytest.approx(0.02, rel=0.15)


def test_synth_values_depend_on_seed_and_name_only(tmp_path, tiny_synth):
    deeper = tensors_of(synthesize(tmp_path / "deeper", "tiny", 3))
    for name, tensor in tensors_of(tiny_synth).items():
        assert torch.equal(deeper[name], tensor), name  # other depth and sharding, same values
    other = tensors_of(synthesize(tmp_path / "other", "tiny", 1, seed=1))
    assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"],
                           deeper["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_synth_refuses_an_existing_output_and_unknown_shapes(tmp_path, tiny_synth):
    from streamsvd.errors import StreamSVDError

    with pytest.raises(StreamSVDError, match="already exists"):
        synthesize(tiny_synth, "tiny", 1)
    with pytest.raises(StreamSVDError, match="unknown shape"):
        synthesize(tmp_path / "x", "175b", 1)


# -- the plan against a real run ---------------------------------------------------------


# What `/usr/bin/time -v` does: fork (not vfork: a vforked child's maximum RSS starts
# from its parent's), exec the command, and read ru_maxrss from wait4.
_TIME = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"maxrss_kib={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured_from_outside(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd` and return its peak resident bytes as an outside tool sees it: GNU time
    where it is installed, else the same system call from Python."""
    if Path("/usr/bin/time").exists():
        launcher = ["/usr/bin/time", "-f", "maxrss_kib=%M"]
    else:
        launcher = [sys.executable, "-c", _TIME]
    run = subprocess.run([*launcher, *cmd], capture_output=True, text=True)
    maxrss = int(run.stderr.strip().splitlines()[-1].removeprefix("maxrss_kib="))
    return run, maxrss * 1024


@pytest.mark.parametrize(
    "statistics",
    [
        # one refinement epoch where refinement is not what the case is about: memory does
        # not grow with the epochs (the 4-epoch case checks it), time does
        "--sequential --refine-epochs=1",  # refinement steps of 2 windows, from batches of 4
        "--no-sequential --refine-epochs=1",
        "--refine-epochs=1 --refine-batch=4",  # steps of a whole calibration batch
        "--refine-epochs=4",
        "--bits=4 --refine-epochs=1",
    ],  # fmt: skip
)
def test_plan_is_within_25_percent_of_a_real_run(tmp_path, small_calib_text, statistics):
    """`compress --dry-run`, then the run itself, each in its own process so that each
    measures its own memory. The run directory's disk is measured at its fullest by a run
    killed as it writes its last shard (the resume tests' fault injection). Sequential
    statistics hold one stage's sums at a time, and the plan says so; block refinement
    and quantization add a phase each, planned and measured."""
    ckpt = synthesize(tmp_path / "model", PLAN_SHAPE, 2, dtype=torch.float32)
    out, plan_json, summary_json = tmp_path / "out", tmp_path / "plan.json", tmp_path / "s.json"
    args = ["--model", str(ckpt), "--out", str(out), "--method", "svdllm-a", "--ratio", "0.3",
            "--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--device", "cpu",
            "--calib", str(small_calib_text), "--allow-few-tokens",  # memory, not quality
            *statistics.split()]  # fmt: skip
    cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", *args]
    dry = subprocess.run([*cli, "--dry-run", "--summary-json", str(plan_json)],
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "peak host" in dry.stdout and "rank" in dry.stdout
    assert not out.exists() and not Path(f"{out}.work").exists()
    plan = json.loads(plan_json.read_text())

    env = {**os.environ, "STREAMSVD_FAULT": "rest:kill"}
    killed = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert killed.returncode != 0
    disk_at_fullest = disk_used(Path(f"{out}.work"))
    run, outside_rss = run_measured_from_outside(
        [*cli, "--restart", "--summary-json", str(summary_json)]
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(summary_json.read_text())

    measured_rss = summary["peak_rss_mb"] * 2**20
    # phase peaks are sampled: the kernel's counters, which outside tools read, stay whole
    assert outside_rss == pytest.approx(measured_rss, rel=0.02)
    fixed = plan["fixed_bytes"]["after"]
    assert plan["host_peak_bytes"] == pytest.approx(measured_rss, rel=0.25)
    # the phases the plan models, beyond the interpreter: a looser bound, still a real one
    # (the speed micro-benchmark's phase is measured by the plan, not modelled)
    block_phases = [p for p in summary["phase_peaks"] if p in plan["host_phases"]]
    assert {"statistics", "factorise"} <= set(block_phases)
    for phase in block_phases:
        measured = summary["phase_peaks"][phase]["host_mb"] * 2**20
        assert plan["host_phases"][phase] - fixed == pytest.approx(measured - fixed, rel=0.5), phase
    assert "timing" in plan["host_phases"]
    assert plan["params_after"] == summary["params_after"]
    assert plan["params_before"] == summary["params_before"]
    assert plan["output_bytes"] == pytest.approx(summary["size_on_disk_bytes"], rel=0.25)
    run_disk = plan["disk_bytes"]["activations"] + plan["disk_bytes"]["output"]
    assert run_disk == pytest.approx(disk_at_fullest, rel=0.25)
    assert plan["activation_bytes_per_stream"] == 2 * 8 * 64 * PLAN_SHAPE.hidden * 4
    assert "work" in run.stdout and "overhead" in run.stdout  # the time breakdown
    # peaks by phase and seconds by block, which benchmarks/scale.py reports against the plan
    assert {"statistics", "factorise"} <= set(summary["phase_peaks"])
    for phase, peaks in summary["phase_peaks"].items():
        assert 0 < peaks["host_mb"] <= summary["peak_rss_mb"] + 1, phase
    if "refine" in statistics:
        measured = summary["phase_peaks"]["refine"]["host_mb"] * 2**20
        assert plan["host_phases"]["refine"] == pytest.approx(measured, rel=0.25)
        assert plan["seconds_per_block"]["refine"] > 0
    if "bits" in statistics:
        measured = summary["phase_peaks"]["quantize"]["host_mb"] * 2**20
        assert plan["host_phases"]["quantize"] == pytest.approx(measured, rel=0.25)
        assert plan["seconds_per_block"]["quantize"] > 0
    assert [b["block"] for b in summary["block_seconds"]] == [0, 1]
    assert "time" in dry.stdout and plan["seconds_per_block"]["total"] > 0


def test_plan_finds_shared_inputs_and_ranks_without_loading_weights(tiny_synth, tmp_path):
    from streamsvd.plan import make_plan

    # without refinement, which carries both streams whatever the method
    cfg = CompressConfig(model=str(tiny_synth), out=str(tmp_path / "o"), method="svdllm-w",
                         ratio=0.4, refine_epochs=0)  # fmt: skip
    plan = make_plan(cfg, fixed={"peak": 0, "after": 0})
    assert plan.input_groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # floor(0.6·m·n/(m + n)) by hand: q/o 128×128, k/v 64×128, gate/up 344×128, down 128×344
    assert {lp.name: lp.rank for lp in plan.linears} == {
        "self_attn.q_proj": 38, "self_attn.k_proj": 25, "self_attn.v_proj": 25,
        "self_attn.o_proj": 38, "mlp.gate_proj": 55, "mlp.up_proj": 55, "mlp.down_proj": 55,
    }  # fmt: skip
    assert plan.streams == ("orig",) and plan.ok


# -- streamed evaluation ---------------------------------------------------------------


@torch.no_grad()
def test_streamed_eval_equals_in_memory_on_bf16_gqa_shards(tiny_synth, tmp_path):
    out = tmp_path / "compressed"
    compress(CompressConfig(model=str(tiny_synth), out=str(out), method="svd", ratio=0.5,
                          refine_epochs=0))  # fmt: skip
    windows = torch.randint(1, 1024, (5, 24), generator=torch.Generator().manual_seed(0))
    # on a CPU the streamed evaluation runs bf16 weights in float32 (model.compute_dtype)
    plain = AutoModelForCausalLM.from_pretrained(tiny_synth, dtype=torch.float32).eval()
    results = []
    for path, model in ((tiny_synth, plain), (out, load_compressed(out, as_stored=False))):
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
        want = math.exp(float(torch.stack(losses).float().mean()))
        got = perplexity(path, windows, batch_size=2, progress=False)
        assert got == pytest.approx(want, rel=1e-3)
        results.append(got)
    assert results[0] != results[1]


# -- time breakdown and prefetching -----------------------------------------------------


class _FakeCuda:
    """torch.cuda's timing calls, stubbed on a CPU: an event records `clock()` when
    recorded; every wait (a device synchronize, an event's) is counted."""

    def __init__(self, monkeypatch, clock):
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False):
                assert enable_timing
                self.at = None

            def record(self, stream=None):
                self.at = clock()
                fake.recorded += 1

            def synchronize(self):
                fake.event_waits += 1

            def elapsed_time(self, end) -> float:
                return (end.at - self.at) * 1000  # ms, as torch's

        self.recorded = self.event_waits = self.device_syncs = 0
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", self._synchronize)

    def _synchronize(self, device=None):
        self.device_syncs += 1

    @property
    def waits(self) -> int:
        return self.event_waits + self.device_syncs


@pytest.mark.parametrize("cuda", [False, True])
def test_stage_timer_counts_nested_time_once(monkeypatch, cuda):
    """On a clock the test moves by hand: time inside an inner stage counts for it alone,
    an enclosing stage resumes where the inner one ends, time outside stages counts for
    none, and a stage entered twice adds up. On CUDA (stubbed: events read the same clock)
    no stage waits for the device: the events are resolved, with one wait, when the
    seconds are read."""
    from streamsvd import pipeline

    now = [100.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: now[0])
    fake = _FakeCuda(monkeypatch, lambda: now[0])
    timer = StageTimer(cuda=cuda)
    with timer("forward"):
        now[0] += 2
        with timer("activations"):
            now[0] += 3
        now[0] += 1
        with timer("activations"):
            now[0] += 0.5
    now[0] += 7
    with timer("write"):
        now[0] += 0.25
    assert fake.waits == 0
    assert dict(timer.seconds) == {"forward": 3.0, "activations": 3.5, "write": 0.25}
    assert dict(timer.seconds) == {"forward": 3.0, "activations": 3.5, "write": 0.25}
    assert (fake.recorded, fake.event_waits) == ((8, 1) if cuda else (0, 0))  # 4 stages
    assert fake.device_syncs == 0


def test_a_blocks_stages_wait_for_the_device_at_most_once(tiny_synth, tmp_path, monkeypatch,
                                                          small_calib_text):  # fmt: skip
    """A run timed as on CUDA (the calls stubbed, the compute on the CPU): its stages record
    events and never synchronize; each block waits at most once, when its stage times are
    read (block 1 once more, for the stages before it), and the times still account for
    the block."""
    from streamsvd import pipeline

    fake = _FakeCuda(monkeypatch, time.perf_counter)
    monkeypatch.setattr(pipeline, "StageTimer", lambda cuda=False: StageTimer(cuda=True))
    per_block = []
    compress_block = pipeline.Compressor._compress_block

    def counted(self, i, kwargs):
        before, recorded = fake.waits, fake.recorded
        compress_block(self, i, kwargs)
        per_block.append((fake.waits - before, fake.recorded - recorded))

    monkeypatch.setattr(pipeline.Compressor, "_compress_block", counted)
    summary = compress(CompressConfig(model=str(tiny_synth), out=str(tmp_path / "out"),
                                      nsamples=4, seqlen=16, batch_size=2,
                                      calib=str(small_calib_text), allow_few_tokens=True,
                                      refine_epochs=1))  # fmt: skip
    assert len(per_block) == 2 and fake.device_syncs == 0
    # block 1 also resolves the stages before it (block 0's inputs) as it starts
    waits = [w for w, _ in per_block]
    assert waits[0] <= 2 and waits[1] <= 1, waits
    assert all(recorded > 20 for _, recorded in per_block)  # dozens of stage boundaries
    for block in summary["block_seconds"]:
        stages = {k: v for k, v in block.items() if k not in ("block", "total")}
        assert {"load", "forward", "stats", "refine", "write"} <= set(stages)
        assert sum(stages.values()) <= block["total"] + 0.05  # each rounded to 0.01 s


class _CountedCopies(torch.Tensor):
    """A tensor that counts the copies made from it (as a device tensor's to the host)."""

    copies = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        copying = (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.contiguous, torch.Tensor.clone)
        if func in copying and out is not args[0]:
            cls.copies += 1
        return out


def test_an_activation_write_copies_to_the_host_once(tmp_path):
    """RunDir.write stores a batch and feeds its stream's digest from one host copy (made
    here by a dtype change, as a device tensor's copy would be); the digest is still the
    stored bytes', as a resume reads them back."""
    import hashlib
    from types import SimpleNamespace

    from streamsvd.activations import ActivationStore
    from streamsvd.rundir import RunDir

    store = ActivationStore(tmp_path / "acts", 3, 4, 8, torch.bfloat16)
    store.reset("orig", 0)
    run = SimpleNamespace(timer=StageTimer(), store=store, offset=10, durable=True)
    values = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    digest = hashlib.sha256()
    _CountedCopies.copies = 0
    RunDir.write(run, "orig", 0, 10, values.as_subclass(_CountedCopies), digest)
    assert _CountedCopies.copies == 1
    assert torch.equal(store.read("orig", 0, 0, 3), values.to(torch.bfloat16))
    assert digest.hexdigest() == store.checksum("orig", 0)


def test_data_ranges_locate_every_tensor(tiny_synth):
    reader = CheckpointReader(tiny_synth)
    for shard in sorted(set(reader.weight_map.values())):
        raw = (tiny_synth / shard).read_bytes()
        with safe_open(tiny_synth / shard, "pt") as f:
            for name, (start, stop) in data_ranges(tiny_synth / shard).items():
                expected = f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
                assert raw[start:stop] == expected


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_prefetch_asks_the_kernel_for_exactly_the_blocks_bytes(tiny_synth, monkeypatch):
    """The advice prefetch gives (posix_fadvise WILLNEED), recorded: one range per tensor
    of the block, each holding exactly that tensor's bytes, in whichever shard it is."""
    reader = CheckpointReader(tiny_synth)
    names = reader.under("model.layers.1")
    opened, advised = {}, []
    real_open = os.open

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = Path(path)
        return fd

    def recording_fadvise(fd, offset, length, advice):
        advised.append((opened[fd], offset, length, advice))

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    reader.prefetch(names)
    monkeypatch.undo()
    assert {advice for *_, advice in advised} == {os.POSIX_FADV_WILLNEED}
    got = sorted((path.name, path.read_bytes()[offset : offset + length])
                 for path, offset, length, _ in advised)  # fmt: skip
    want = []
    for name in names:
        with safe_open(tiny_synth / reader.weight_map[name], "pt") as f:
            data = f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
        want.append((reader.weight_map[name], data))
    assert len(advised) == len(names) and got == sorted(want)
    assert len({path for path, *_ in advised}) > 1  # the block spans shards


def test_randomized_svd_is_deterministic_and_close_to_svd():
    from streamsvd.synth import _decaying_rows

    W = torch.cat(list(_decaying_rows((96, 256), 3))).double()
    rank = rank_for(96, 256, 0.6)
    A, B = randomized_svd(W, None, rank)
    A2, B2 = randomized_svd(W, None, rank)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    err = torch.linalg.norm(W - A @ B)
    best = torch.linalg.norm(W - torch.mm(*plain_svd(W, None, rank)))
    assert best <= err <= 1.05 * best


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_of_a_child_excludes_its_parents_memory():
    """ru_maxrss of a process started from a big parent counts the parent's memory (the
    benchmark once reported 4 GB for a 0.5 GB compression); peak_rss_bytes must not."""
    size = 1 << 30
    held = torch.ones(size // 4)  # 1 GiB resident in this (parent) process
    probe = (
        "import resource; from streamsvd.memory import peak_rss_bytes; "
        "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    child_peak, child_maxrss = map(int, done.stdout.split())
    assert held.sum() > 0
    assert child_maxrss > size  # the old measure: includes the parent's gigabyte
    assert child_peak < size  # an interpreter that imports streamsvd (torch, transformers)


# -- the plan at real widths, from shapes alone -------------------------------------------


def test_a_70b_block_fits_in_20_gib_of_host_and_24_gib_of_gpu_by_the_plan(tmp_path):
    """The headline, as the plan sees it (benchmarks/scale.py measures it): the default
    method at 70B width, compress's default calibration, from a shape-only checkpoint
    (sparse files: no disk, no time), planned for a 24 GiB GPU that is not here."""
    ckpt = synthesize(tmp_path / "70b", "70b", 1, values=False)
    assert sum(p.stat().st_blocks for p in ckpt.iterdir()) * 512 < 2**20  # sparse
    fixed = {"peak": 600 * 2**20, "after": 550 * 2**20}  # the interpreter, as measured
    # the plan adapts to the memory it is given (refinement holds its streams where there
    # is room): plan for a 20 GiB host, not for whatever this machine has free
    host20 = {"host": (20 * 2**30, "host memory (test)")}
    cpu = make_plan(CompressConfig(model=str(ckpt), out=str(tmp_path / "o")), fixed,
                    timing=False, have=host20)  # fmt: skip
    assert cpu.method == "svdllm-a" and cpu.host_peak_bytes <= 20 * 2**30
    assert cpu.refine_streams == "store" and all(c["ok"] for c in cpu.checks[:1])
    # with room, auto holds the streams in host memory instead, and counts them
    roomy = make_plan(CompressConfig(model=str(ckpt), out=str(tmp_path / "o")), fixed,
                      timing=False, have={"host": (64 * 2**30, "host memory (test)")})  # fmt: skip
    assert roomy.refine_streams == "host" and roomy.host_peak_bytes > cpu.host_peak_bytes
    bf16_cfg = CompressConfig(model=str(ckpt), out=str(tmp_path / "o"), compute_dtype="checkpoint")
    in_bf16 = make_plan(bf16_cfg, fixed, timing=False, have=host20)
    # the CPU runs the bf16 block in float32: at least its weights take 2 bytes more each
    shapes = CheckpointReader(ckpt).shapes()
    block_params = sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    assert cpu.host_peak_bytes >= in_bf16.host_peak_bytes + 2 * block_params
    gpu_cfg = CompressConfig(model=str(ckpt), out=str(tmp_path / "o"), device="cuda")
    gpu = make_plan(gpu_cfg, fixed, device_memory=24 * 2**30, timing=False)
    assert gpu.device_peak_bytes <= 24 * 2**30
    assert gpu.checks[1]["what"] == "device memory (--device-memory)"
    # the run times the GPU first, at 4096 (speed.BENCH_N_CUDA): the plan's first phase
    assert list(gpu.device_phases)[0] == "timing"
    assert gpu.device_phases["timing"] >= 6 * 4096**2 * 8
    # the sums are the bulk: down_proj's G' (28672²) and W·C (8192×28672) in float64
    assert cpu.host_phases["statistics"] > (28672**2 + 8192 * 28672) * 8
    # with 4-bit factors: GPTQ holds down_proj's G' and its float32 inverse factor besides.
    # On a CPU the block runs in float32 (model.compute_dtype), which then passes 20 GiB
    # (about 21.6): --compute-dtype checkpoint keeps it in bf16, as the GPU runs it.
    for device, plan in (("cpu", None), ("cuda", None)):
        cfg = CompressConfig(model=str(ckpt), out=str(tmp_path / "o"), device=device, bits=4,
                             compute_dtype="checkpoint")  # fmt: skip
        gib24 = {"device": (24 * 2**30, "device memory (test)")}
        plan = make_plan(cfg, fixed, timing=False, have=host20 | gib24)
        peak = plan.host_peak_bytes if device == "cpu" else plan.device_peak_bytes
        assert peak <= (20 if device == "cpu" else 24) * 2**30, device
        phases = plan.host_phases if device == "cpu" else plan.device_phases
        assert phases["quantize"] > 28672**2 * (8 + 4)


def test_the_plan_of_the_measured_70b_run_matches_what_it_measured(tmp_path):
    """benchmarks/scale.py ran two real 70B-width blocks (bf16, ratio 0.2, 8×256 tokens,
    batch 4, with the defaults of its time: no refinement, statistics of all linears at
    once) and recorded their peak RSS by phase. The plan of those settings today must still
    say what that run measured: the plan against a measurement, not against itself. The run
    measured 0.98-1.00 of its own plan; 5% allows for that and for the interpreter's size,
    which differs by machine (~0.6 GiB of 15 GiB), not for a missed buffer (down_proj's
    sums alone are 40% of the peak)."""
    results = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text())
    assert results["calibration"] == "8×256 tokens of WikiText-2 valid, batch 4, bf16, ratio 0.2"
    measured = next(run for run in results["runs"] if run["run"] == "70b:2")
    ckpt = synthesize(tmp_path / "70b", "70b", 2, values=False)
    # its blocks ran in bf16 on the CPU, as the compute dtype "auto" then had them
    cfg = CompressConfig(model=str(ckpt), out=str(tmp_path / "o"), method="svdllm-a",
                         ratio=0.2, nsamples=8, seqlen=256, batch_size=4, refine_epochs=0,
                         sequential=False, allow_few_tokens=True,
                         compute_dtype="checkpoint")  # fmt: skip
    plan = make_plan(cfg, {"peak": 600 * 2**20, "after": 550 * 2**20}, timing=False)
    for phase in ("statistics", "factorise"):
        got = measured["phases"][phase]["measured"]
        assert plan.host_phases[phase] == pytest.approx(got, rel=0.05), phase
    assert plan.host_peak_bytes == pytest.approx(measured["peak_rss"], rel=0.05)


def test_out_of_memory_names_the_phase(tiny_synth, tmp_path, small_calib_text):
    """A device OOM inside a phase becomes a message that names it and says what to do
    (on a GPU run it also gives the plan's figure for that phase)."""
    from streamsvd.errors import StreamSVDError
    from streamsvd.pipeline import Compressor

    cfg = CompressConfig(model=str(tiny_synth), out=str(tmp_path / "out"), nsamples=2,
                         seqlen=16, calib=str(small_calib_text), allow_few_tokens=True)  # fmt: skip
    compressor = Compressor(cfg)
    with pytest.raises(StreamSVDError, match="factorise phase.*--batch-size.*resumes"):
        with compressor._phase("factorise"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
    assert "factorise" not in compressor.phase_peaks  # a failed phase records no peak


# -- the dtype blocks run in -------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, checkpoint, device, runs_in",
    [
        ("auto", torch.bfloat16, "cpu", torch.float32),  # CPU half precision: slow (bf16_cpu.md)
        ("auto", torch.bfloat16, "cuda", torch.bfloat16),  # native on a GPU, float32's range
        ("auto", torch.float16, "cuda", torch.float32),  # overflows at 65504
        ("auto", torch.float32, "cpu", torch.float32),
        ("checkpoint", torch.bfloat16, "cpu", torch.bfloat16),
        ("float32", torch.bfloat16, "cuda:1", torch.float32),
    ],
)
def test_compute_dtype(setting, checkpoint, device, runs_in):
    assert compute_dtype(setting, checkpoint, device) == runs_in


def test_bf16_checkpoint_runs_in_float32_on_a_cpu_and_is_written_in_bf16(tiny_synth, tmp_path):
    out = tmp_path / "out"
    summary = compress(CompressConfig(model=str(tiny_synth), out=str(out), method="svd",
                                      ratio=0.5, refine_epochs=0))  # fmt: skip
    assert (summary["compute_dtype"], summary["dtype"]) == ("float32", "bfloat16")
    written = tensors_of(out)
    assert {t.dtype for n, t in written.items() if n.endswith(".weight")} == {torch.bfloat16}
    assert load_compressed(out).dtype == torch.bfloat16  # as written, unless asked
    assert load_compressed(out, as_stored=False).dtype == torch.float32
