"""Two gloo processes on CPU (torchrun), as docs/distributed.md describes: repeated runs give
the same bytes, the output matches one process's (closed form and refined), a rank killed
mid-block resumes to the same bytes (with data-parallel refinement), a rank that hangs stops
the other with a message naming it, and another number of processes is refused on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from test_resume import output_hashes

from streamsvd import CompressConfig, compress, load_compressed

SETTINGS = dict(nsamples=16, seqlen=32, batch_size=4, ratio=0.4, seed=0, device="cpu")
# Two processes add their float64 sums in another order than one process does (relative
# differences near 2⁻⁵³). Where calibration determines the factors, the two outputs then
# agree to the float32 rounding of what each writes and runs (u = 2⁻²⁴ ≈ 6e-8), which
# compounds over the ~10 rounded steps of each of the 3 blocks; directions the calibration
# never excites are not determined at all (a rank-deficient Gram), so the outputs are
# compared as logits, not weights. 1e-5 ≈ 170·u: 5× the 30 roundings.
LOGITS_RTOL = 1e-5
CLOSED_FORM = ("--refine-epochs", "0")


def torchrun(model: Path, calib: Path, out: Path, *extra: str, processes: int = 2,
             fault: str | None = None, timeout: float = 300,
             entry: tuple[str, ...] = ("-m", "streamsvd"),
             **env_more) -> subprocess.CompletedProcess:  # fmt: skip
    """`streamsvd compress` (or `entry`, a script taking its arguments) under torchrun."""
    env = {**os.environ, **env_more}
    env.pop("STREAMSVD_FAULT", None)
    if fault:
        env.update(STREAMSVD_FAULT=fault, STREAMSVD_FAULT_RANK="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", *entry, "compress", "--model", str(model),
            "--out", str(out), "--calib", str(calib), *extra]  # fmt: skip
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_calib_text):
    root = tmp_path_factory.mktemp("distributed")
    model = write_checkpoint(root / "model", tiny_config(layers=3))
    reference = root / "two"
    done = torchrun(model, small_calib_text, reference, *CLOSED_FORM)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, model, small_calib_text, reference


def _logits(path: Path) -> torch.Tensor:
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return load_compressed(path).eval()(ids).logits.double()


def test_two_processes_repeat_their_bytes_and_match_one(setup):
    root, model, calib, reference = setup
    again = root / "two-again"
    done = torchrun(model, calib, again, *CLOSED_FORM)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output_hashes(again) == output_hashes(reference)

    one = root / "one"
    compress(CompressConfig(model=str(model), out=str(one), calib=str(calib), refine_epochs=0,
                            **SETTINGS))  # fmt: skip
    a, b = _logits(one), _logits(reference)
    assert float((a - b).norm() / a.norm()) <= LOGITS_RTOL
    # the rest (embeddings, norms) is copied through, byte for byte
    assert (
        output_hashes(one)["model-00001-of-00004.safetensors"]
        == output_hashes(reference)["model-00001-of-00004.safetensors"]
    )


def _perturbed(model: Path, out: Path) -> Path:
    """The checkpoint with every block weight moved by a relative 2⁻²⁴ (one float32
    rounding) in a random direction."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    gen = torch.Generator().manual_seed(1)
    for f in sorted(model.iterdir()):
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
            continue
        tensors = load_file(f)
        for name, t in tensors.items():
            if ".layers." in name:
                noise = 2**-24 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
                tensors[name] = (t.double() * (1 + noise)).to(t.dtype)
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    return out


def test_two_processes_refine_as_one_does(setup, tmp_path):
    """Each refinement step's windows are split over the ranks, so two processes take one
    process's steps. Not to rounding, though: AdamW divides each gradient by its running
    size, so directions whose gradients are rounding noise take full-size steps, and
    refinement amplifies any rounding-level difference (here the closed forms' float64
    sum order, ~1e-6 of the logits) a thousandfold. The bound is therefore what one
    float32 rounding of every block weight does to one process's refined output, measured
    here, times 10: two processes that each took their own 2-window steps (4 windows a
    step) were 11% from one process, about 100 times that response."""
    root, model, calib, _ = setup
    refine = dict(refine_epochs=4, refine_batch=2)
    two = tmp_path / "two"
    done = torchrun(model, calib, two, "--refine-epochs", "4", "--refine-batch", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    one, nudged = tmp_path / "one", tmp_path / "nudged"
    compress(CompressConfig(model=str(model), out=str(one), calib=str(calib), **refine,
                            **SETTINGS))  # fmt: skip
    compress(CompressConfig(model=str(_perturbed(model, tmp_path / "model")), out=str(nudged),
                            calib=str(calib), **refine, **SETTINGS))  # fmt: skip
    a, b, c = _logits(one), _logits(two), _logits(nudged)
    rounding = float((a - c).norm() / a.norm())
    assert 0 < rounding < 0.01  # refinement did amplify it, and it stays small
    assert float((a - b).norm() / a.norm()) <= 10 * rounding


def test_a_killed_rank_resumes_to_the_same_bytes_and_other_counts_are_refused(setup, tmp_path):
    """With refinement, which is data-parallel: rank 1 is killed in block 2's refinement;
    one process is refused the run; two resume it to an uninterrupted run's bytes."""
    root, model, calib, _ = setup
    refine = ("--refine-epochs", "2")
    reference, out = tmp_path / "reference", tmp_path / "out"
    done = torchrun(model, calib, reference, *refine)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refinement loss" in done.stderr

    killed = torchrun(model, calib, out, *refine, fault="refine:1")
    assert killed.returncode != 0
    assert "exitcode  : -9" in killed.stderr  # torchrun's report names the killed rank
    journal = (Path(f"{out}.work") / "journal.json").read_text()
    assert '"block.0"' in journal and '"block.1"' not in journal

    refused = torchrun(model, calib, out, *refine, processes=1)
    assert refused.returncode != 0  # torchrun exits 1 whatever its processes return
    assert "processes: was 2, now 1" in refused.stderr
    assert "with as many processes as before" in refused.stderr

    resumed = torchrun(model, calib, out, *refine)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at block 2/3" in resumed.stderr
    assert output_hashes(out) == output_hashes(reference)


def test_a_hung_rank_stops_the_other_with_its_name(setup, tmp_path):
    root, model, calib, _ = setup
    marker = tmp_path / "paused"
    hung = torchrun(model, calib, tmp_path / "out", "--dist-timeout", "15",
                    fault="svd:1:pause", STREAMSVD_FAULT_MARKER=str(marker),
                    timeout=120)  # fmt: skip
    assert hung.returncode != 0
    assert "rank 0 of 2, at block 2's factors" in hung.stderr
    assert "Rank 1 failed to pass monitoredBarrier" in hung.stderr
    assert "--dist-timeout (15s)" in hung.stderr


# One rank of a run whose journal rank 1 sees otherwise: `own-file`, rank 1's own reading of
# journal.json is empty (as when rank 0 rewrites it as it is read), which a rank must never
# go by; `differ`, rank 1 holds another journal than rank 0 once the run has begun.
RANK_SCRIPT = """
import json, logging, sys
from streamsvd import journal
from streamsvd.errors import StreamSVDError
from streamsvd.pipeline import CompressConfig, Compressor
from streamsvd.world import World

model, calib, out, how, settings = sys.argv[1:6]
logging.basicConfig(level=logging.INFO)
world = World.from_env("cpu", timeout=60)
if how == "own-file" and world.rank == 1:
    journal.read_stages = lambda workdir: {}
cfg = CompressConfig(model=model, out=out, calib=calib, refine_epochs=0, **json.loads(settings))
compressor = Compressor(cfg, world)
if how == "differ" and world.rank == 1:
    compressor.journal.stages.pop("block.1")
try:
    compressor.run()
except StreamSVDError as exc:
    print(f"rank {world.rank} stopped: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
finally:
    world.close()
"""


def test_ranks_take_rank_0s_journal_and_stop_when_theirs_differ(setup, tmp_path):
    """Killed after two blocks, the run resumes on both ranks where rank 0's journal says,
    whatever rank 1 would read itself, to an uninterrupted run's bytes; ranks that hold
    different journals stop before any sum, both naming the difference, and record nothing."""
    root, model, calib, reference = setup
    out = tmp_path / "out"
    killed = torchrun(model, calib, out, *CLOSED_FORM, fault="between:2")
    assert killed.returncode != 0
    journal = Path(f"{out}.work") / "journal.json"
    before = journal.read_bytes()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)

    def ranks(how: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(script), str(model), str(calib), str(out), how,
                json.dumps(SETTINGS)]  # fmt: skip
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    differ = ranks("differ")
    assert differ.returncode != 0
    # rank 0's word (torchrun may stop rank 1 before it prints the same)
    assert "rank 0 stopped: rank 1 of 2 differs from rank 0 before the run" in differ.stderr
    assert "in journal (rank 0: '" in differ.stderr
    assert journal.read_bytes() == before

    resumed = ranks("own-file")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at block 3/3" in resumed.stderr
    assert output_hashes(out) == output_hashes(reference)


def test_quantized_factors_are_the_same_on_every_rank(setup, tmp_path):
    """With --bits each linear is quantized by one rank and broadcast; every block's commit
    compares the digest of what each rank would write, so a finished run shows the ranks'
    bits agree. The output matches another two-process run's bytes."""
    root, model, calib, _ = setup
    quant = ("--bits", "4", "--group-size", "16")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        done = torchrun(model, calib, out, *CLOSED_FORM, *quant)
        assert done.returncode == 0, done.stderr[-3000:]
    assert output_hashes(outs[0]) == output_hashes(outs[1])
    assert any(k.endswith(".down.weight_packed") for k in output_hashes(outs[0]))


class _RecordingWorld:
    """Rank `rank` of 2, its collectives recorded instead of run (the other rank is taken
    to have seen the same groups)."""

    distributed, size = True, 2

    def __init__(self, rank: int):
        self.rank, self.calls = rank, []

    def owner(self, k: int) -> int:
        return k % self.size

    def barrier(self, what: str) -> None:
        pass

    def gather(self, value) -> list:
        return [value] * self.size

    def sum_(self, tensors: list) -> None:
        self.calls.append(("all", [tuple(t.shape) for t in tensors]))

    def reduce_(self, tensors: list, dst: int) -> None:
        self.calls.append((dst, [tuple(t.shape) for t in tensors]))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_groups_sums_go_to_the_ranks_that_factorise_it(rank):
    """Linears are dealt out k mod 2 (q 0, k 1, v 0, o 1, gate 0, up 1, down 0): a group with
    one such rank (o_proj's inputs, down_proj's) is reduced into it and freed on the other,
    keeping its token count; one factorised on both (q/k/v, gate/up) is all-reduced."""
    from streamsvd.stats import InputStats
    from streamsvd.step import BlockStep

    names = ["q", "k", "v", "o", "gate", "up", "down"]
    widths = {"q": 8, "k": 8, "v": 8, "o": 6, "gate": 8, "up": 8, "down": 12}
    needs = frozenset({"orig"})
    stats = {}
    for group in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)):
        shared = InputStats(widths[group[0]], needs, "cpu")
        shared.tokens = 5
        stats.update({name: shared for name in group})
    world = _RecordingWorld(rank)
    step = BlockStep(None, {}, {}, [], torch.device("cpu"), world=world)
    step._add_up(stats, needs, names)
    sums = [call for call in world.calls if call[1] != [(1,)]]  # the token counts apart
    # groups in name order on every rank: down, gate/up, o, q/k/v
    assert sums == [(0, [(12, 12)]), ("all", [(8, 8)]), (1, [(6, 6)]), ("all", [(8, 8)])]
    assert sum(call == ("all", [(1,)]) for call in world.calls) == 4  # every group's tokens
    kept = {name: stats[name].G is not None for name in ("o", "down")}
    assert kept == {"o": rank == 1, "down": rank == 0}
    assert all(group.tokens == 5 for group in stats.values())
