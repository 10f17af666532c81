"""Resumable runs: kill a compress run anywhere, run the same command again, and get the
same bytes as a run that was never interrupted.

Kills are real: the CLI runs in a subprocess and STREAMSVD_FAULT (streamsvd/faults.py)
makes it SIGKILL itself, or fail a write with ENOSPC, at a named point. Each chain of
kills resumes after every one of them, then checks the final output file by file and
tensor by tensor against an uninterrupted in-process run of the same settings. Subprocesses
run with one thread, like the reference: CPU results depend on the thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from safetensors import SafetensorError, safe_open

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd import checkpoint as checkpoint_module
from streamsvd import prepare as prepare_module
from streamsvd.calib import stdlib_docstrings
from streamsvd.checkpoint import save_shard
from streamsvd.cli import format_summary
from streamsvd.cli import main as cli_main
from streamsvd.errors import StreamSVDError
from streamsvd.pipeline import Compressor

LAYERS = 3
SETTINGS = dict(nsamples=8, seqlen=32, batch_size=4, ratio=0.3, seed=3, device="cpu")
KILLED = -9  # a subprocess that ended by SIGKILL


@pytest.fixture(scope="module")
def one_thread():
    """The reference runs with one thread, as the subprocesses do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A 3-block checkpoint, a calibration text, and reference outputs made on demand."""
    root = tmp_path_factory.mktemp("resume")
    model = write_checkpoint(root / "model", tiny_config(layers=LAYERS))
    calib = root / "calib.txt"
    calib.write_text(stdlib_docstrings(40_000))
    references: dict[str, dict] = {}

    def reference(method: str) -> dict:
        if method not in references:
            out = root / f"reference-{method}"
            compress(_config(model, calib, out, method))
            references[method] = output_hashes(out)
        return references[method]

    return model, calib, reference


def _config(model: Path, calib: Path, out: Path, method: str, **changes) -> CompressConfig:
    return CompressConfig(
        model=str(model), out=str(out), method=method, calib=str(calib), **{**SETTINGS, **changes}
    )


def output_hashes(out: Path) -> dict:
    """SHA-256 of every file, and of every tensor in every safetensors file."""
    hashes = {}
    for path in sorted(out.iterdir()):
        hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    raw = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy()
                    hashes[f"{path.name}:{name}"] = hashlib.sha256(raw.tobytes()).hexdigest()
    return hashes


def run_cli(model: Path, calib: Path, out: Path, method: str, fault: str | None = None,
            wait: bool = True, extra: tuple[str, ...] = (), **env_more):  # fmt: skip
    """`streamsvd compress` in a subprocess, optionally with a fault injected and `extra`
    options; wait=False returns the running Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env_more}
    env.pop("STREAMSVD_FAULT", None)
    if fault:
        env["STREAMSVD_FAULT"] = fault
    args = [sys.executable, "-m", "streamsvd.cli", "compress", "--model", str(model),
            "--out", str(out), "--method", method, "--calib", str(calib)]  # fmt: skip
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    args += list(extra)
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def blocks_computed(log: str) -> list[int]:
    """1-based numbers of the blocks a run computed, from its per-block log lines."""
    return [int(n) for n in re.findall(rf"block (\d+)/{LAYERS}: ranks", log)]


def journal(out: Path) -> dict:
    path = Path(f"{out}.work") / "journal.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


# One run per fault, each resuming after the kill before it: the fault, what that run
# logs on starting (None: no resume message, nothing was recorded yet),
# and the blocks journaled once it is killed.
CHAIN = [
    ("inputs", None, []),  # block 1's inputs half written
    ("activations:0", None, []),  # block 2's inputs half written (original stream)
    ("svd:0", "resuming at block 1/3", []),  # between two factorisations
    ("comp-activations:0", "resuming at block 1/3", []),  # the same, compressed stream
    ("shard-write:0", "resuming at block 1/3", []),  # shard under its temporary name
    ("before-journal:0", "resuming at block 1/3", []),  # all written, not journaled
    ("journaled:0", "resuming at block 1/3", [0]),  # right after the journal update
    ("between:1", "resuming at block 2/3", [0]),  # before block 2 is loaded
    ("activations:2", "resuming at block 2/3", [0, 1]),
    ("rest", "resuming at block 3/3", [0, 1, 2]),  # embedding/head shard under its temporary name
    ("finish", "resuming: all 3 blocks are done", [0, 1, 2]),  # output directory half assembled
]


def test_killed_anywhere_resumes_to_identical_bytes(setup, tmp_path):
    model, calib, reference = setup
    out = tmp_path / "out"
    done_before: list[int] = []
    for fault, resumes, done in CHAIN:
        result = run_cli(model, calib, out, "svdllm-a", fault)
        assert result.returncode == KILLED, f"{fault} never fired:\n{result.stderr[-3000:]}"
        if resumes is None:
            assert "resuming" not in result.stderr, fault
        else:
            assert resumes in result.stderr, fault
        # finished blocks are not recomputed; the block in flight is
        assert all(b > len(done_before) for b in blocks_computed(result.stderr)), fault
        assert sorted(s for s in journal(out) if s.startswith("block.")) == [
            f"block.{i}" for i in done
        ], fault
        if fault == "journaled:0":  # renamed into place by the run before, never journaled
            assert "discarding" in result.stderr and "block-00000.safetensors:" in result.stderr
        done_before = done
    # the half-assembled output, the output path and the run directory are all refused
    partial, work = tmp_path / "out.partial", tmp_path / "out.work"
    for path in (partial, out, work):
        with pytest.raises(StreamSVDError, match="incomplete|unfinished"):
            load_compressed(path)
    result = run_cli(model, calib, out, "svdllm-a")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming: all 3 blocks are done" in result.stderr
    assert blocks_computed(result.stderr) == []
    assert output_hashes(out) == reference("svdllm-a")
    assert not work.exists() and not partial.exists()
    assert json.loads((out / "config.json").read_text())["streamsvd"]["complete"] is True


def test_plain_svd_kills_and_corrupt_shard(setup, tmp_path):
    """Without activation streams (plain SVD, not refined) blocks are independent: a
    corrupt shard redoes just its own block, and the rest shard is checked too."""
    model, calib, _ = setup
    out, work = tmp_path / "out", tmp_path / "out.work"
    closed = ("--refine-epochs", "0")  # refinement would carry both streams
    compress(_config(model, calib, tmp_path / "reference", "svd", refine_epochs=0))
    assert run_cli(model, calib, out, "svd", "shard-write:1", extra=closed).returncode == KILLED
    assert run_cli(model, calib, out, "svd", "finish", extra=closed).returncode == KILLED
    shard = work / "shards" / "block-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last tensor's data
    shard.write_bytes(bytes(data))
    rest = work / "shards" / "rest.safetensors"
    rest.write_bytes(rest.read_bytes()[:-100])  # truncated
    result = run_cli(model, calib, out, "svd", extra=closed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard of block(s) [1] is missing or corrupt: recomputing" in result.stderr
    assert "embedding and head is missing or corrupt" in result.stderr
    assert blocks_computed(result.stderr) == [1]
    assert output_hashes(out) == output_hashes(tmp_path / "reference")


def test_corrupt_chunk_or_shard_is_recomputed(setup, tmp_path):
    """With streams, damaged activations or a damaged finished shard mean the streams are
    rebuilt from block 1; the output is still identical."""
    model, calib, reference = setup
    out, work = tmp_path / "out", tmp_path / "out.work"
    assert run_cli(model, calib, out, "svdllm-u", "between:2").returncode == KILLED
    # block 3's inputs sit in slot 2 % 2 = 0: truncate one chunk of the compressed stream
    chunks = sorted((work / "activations" / "comp0").glob("c.*"))
    assert len(chunks) == SETTINGS["nsamples"]
    chunks[1].write_bytes(chunks[1].read_bytes()[:50])
    result = run_cli(model, calib, out, "svdllm-u", "between:2")
    assert result.returncode == KILLED
    assert "comp activations (inputs of block 3) are missing or corrupt" in result.stderr
    assert blocks_computed(result.stderr) == [1, 2]
    shard = work / "shards" / "block-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])  # a truncated shard of a finished block
    result = run_cli(model, calib, out, "svdllm-u")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard of block(s) [2] is missing or corrupt: starting over" in result.stderr
    assert blocks_computed(result.stderr) == [1, 2, 3]
    assert output_hashes(out) == reference("svdllm-u")


def test_disk_full_then_resume(setup, tmp_path, capsys):
    model, calib, reference = setup
    out, work = tmp_path / "out", tmp_path / "out.work"
    result = run_cli(model, calib, out, "svdllm-a", "activations:1:enospc")
    assert result.returncode == 3  # not enough resources
    assert f"no space left on device writing {work / 'activations'}" in result.stderr
    assert "still needs about" in result.stderr and "Traceback" not in result.stderr
    assert sorted(journal(out)) == ["block.0", "checkpoint", "inputs"]
    result = run_cli(model, calib, out, "svdllm-a", "shard-write:1:enospc")
    assert result.returncode == 3
    assert f"writing {work / 'shards' / 'block-00001.safetensors'}" in result.stderr
    assert sorted(journal(out)) == ["block.0", "checkpoint", "inputs"]
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["block-00000.safetensors"]

    assert cli_main(["status", "--workdir", str(work)]) == 0
    status = capsys.readouterr().out
    assert re.search(r"blocks done +1/3 \(next: block 2/3\)", status)
    assert re.search(r"last error +\S+ \S+: no space left on device writing", status)
    assert re.search(r"method +svdllm-a", status)

    result = run_cli(model, calib, out, "svdllm-a")
    assert result.returncode == 0, result.stderr[-3000:]
    assert blocks_computed(result.stderr) == [2, 3]
    assert output_hashes(out) == reference("svdllm-a")


def test_a_run_from_before_a_setting_existed_resumes_at_its_old_value(setup, tmp_path):
    """A manifest written before refine.precision existed resumes with float32 (what such
    runs did), and is refused with bfloat16, naming it."""
    model, calib, _ = setup
    out, work = tmp_path / "out", tmp_path / "out.work"
    Compressor(_config(model, calib, out, "svdllm-a"))  # writes the manifest
    manifest = json.loads((work / "manifest.json").read_text())
    del manifest["refine"]["precision"]  # as the code before it wrote it
    (work / "manifest.json").write_text(json.dumps(manifest))
    Compressor(_config(model, calib, out, "svdllm-a"))  # no refusal
    with pytest.raises(StreamSVDError) as info:
        Compressor(_config(model, calib, out, "svdllm-a", refine_precision="bfloat16"))
    assert "1 difference(s):\n  refine.precision: was None, now 'bfloat16'" in str(info.value)


def test_changed_settings_or_checkpoint_are_refused(setup, tmp_path, capsys):
    model, calib, _ = setup
    out, work = tmp_path / "out", tmp_path / "out.work"
    Compressor(_config(model, calib, out, "svdllm-a"))  # starts a run: writes the manifest
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}

    with pytest.raises(StreamSVDError) as info:
        Compressor(_config(model, calib, out, "svdllm-u", ratio=0.4, nsamples=6))
    message = str(info.value)
    assert "4 difference(s)" in message  # 6 windows hold none out by default, 8 held 2
    for line in ("method: was 'svdllm-a', now 'svdllm-u'", "ratio: was 0.3, now 0.4",
                 "calibration.nsamples: was 8, now 6", "refine.holdout: was 2, now 0"):  # fmt: skip
        assert line in message

    changed = write_checkpoint(tmp_path / "changed", tiny_config(layers=LAYERS), seed=1)
    with pytest.raises(StreamSVDError, match="the model files changed") as info:
        Compressor(_config(changed, calib, out, "svdllm-a"))
    assert "data_sample_sha256: was" in str(info.value)
    assert "model_fingerprint.index_sha256" not in str(info.value)  # same names and shapes

    args = ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib),
            "--method", "svdllm-a"]  # fmt: skip
    for key, value in {**SETTINGS, "ratio": 0.5}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert cli_main(args) == 2
    assert "ratio: was 0.3, now 0.5" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before

    Compressor(_config(model, calib, out, "svdllm-u", restart=True))  # --restart discards it
    assert json.loads((work / "manifest.json").read_text())["method"] == "svdllm-u"


def test_the_summary_counts_every_session_and_names_the_output(setup, tmp_path, monkeypatch):
    """A resumed run's summary gives the time of the sessions before it, journaled with the
    blocks they finished, besides its own, and says where the output went."""
    model, calib, _ = setup
    out = tmp_path / "out"
    cfg = _config(model, calib, out, "svd")
    monkeypatch.setenv("STREAMSVD_FAULT", "between:1:eio")  # block 0 journaled, then a stop
    with pytest.raises(StreamSVDError):
        compress(cfg)
    monkeypatch.delenv("STREAMSVD_FAULT")
    first = journal(out)["block.0"]["session"]["seconds"]
    assert first > 0
    summary = compress(cfg)
    assert summary["sessions"] == 2 and summary["out"] == str(out.resolve())
    both = summary["seconds"] + first  # each rounded to 0.01 s apart from the sum
    assert summary["seconds_all_sessions"] == pytest.approx(both, abs=0.011)
    lines = format_summary(summary).splitlines()
    assert f"s ({summary['seconds_all_sessions']:.1f}s across 2 sessions" in lines[0]
    assert lines[-1] == f"  output       {out.resolve()}"

    once = compress(_config(model, calib, tmp_path / "once", "svd"))  # never interrupted
    assert once["sessions"] == 1 and once["seconds_all_sessions"] == once["seconds"]
    assert "sessions" not in format_summary(once).splitlines()[0]


def test_resume_takes_the_thread_count_the_run_began_with(setup, tmp_path):
    model, calib, _ = setup
    cfg = _config(model, calib, tmp_path / "out", "svdllm-a")
    assert Compressor(cfg).setup.threads == 1
    torch.set_num_threads(2)
    try:
        assert Compressor(cfg).setup.threads == 1  # and no "settings differ" error
    finally:
        torch.set_num_threads(1)


def test_disk_space_is_checked_before_starting(setup, tmp_path, monkeypatch):
    model, calib, _ = setup
    out = tmp_path / "out"
    full = SimpleNamespace(total=10**9, used=10**9, free=4096)
    monkeypatch.setattr(prepare_module.shutil, "disk_usage", lambda path: full)
    with pytest.raises(StreamSVDError, match=r"not enough disk space.*4\.0 KiB is free"):
        Compressor(_config(model, calib, out, "svdllm-a"))
    assert not Path(f"{out}.work").exists()


def test_journal_free_run_writes_the_same_bytes(setup, tmp_path):
    """The benchmark's baseline computes the same thing, minus fsyncs and checksums."""
    model, calib, reference = setup
    out = tmp_path / "out"
    compress(_config(model, calib, out, "svdllm-a", journal=False))
    assert output_hashes(out) == reference("svdllm-a")


def test_save_shard_turns_a_full_disk_into_oserror(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")  # fmt: skip

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    path = tmp_path / "x.safetensors"
    with pytest.raises(OSError) as info:
        save_shard({"w": torch.zeros(3)}, path)
    assert info.value.errno == 28 and info.value.filename == f"{path}.tmp"
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind


def test_a_second_run_on_the_same_work_refuses_while_the_first_finishes(setup, tmp_path):
    """Two processes: the first holds the run directory's lock (paused between blocks 1 and
    2); a second `compress` of the same command refuses at once, naming the first, and
    `status` shows the run live; the first then finishes with the bytes of a lone run."""
    model, calib, reference = setup
    out, marker = tmp_path / "out", tmp_path / "paused"
    first = run_cli(model, calib, out, "svdllm-a", "between:1:pause", wait=False,
                    STREAMSVD_FAULT_MARKER=str(marker))  # fmt: skip
    try:
        for _ in range(1200):
            if marker.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), first.communicate()[1][-3000:]
        second = run_cli(model, calib, out, "svdllm-a")
        assert second.returncode == 3  # not enough resources: the run directory is busy
        assert f"another streamsvd run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        status = subprocess.run([sys.executable, "-m", "streamsvd.cli", "status", "--workdir",
                                 f"{out}.work"], capture_output=True, text=True)  # fmt: skip
        assert f"running now        yes, pid {first.pid}" in status.stdout, status.stdout
    finally:
        marker.unlink(missing_ok=True)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert output_hashes(out) == reference("svdllm-a")
    assert not Path(f"{out}.work.lock").exists()  # a finished run takes its lock file along


def _tensor_shard(model: Path, name: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def _change_mid_tensor(model: Path, name: str) -> None:
    """Change two bytes in the middle of one float32 tensor's data, in place (the low bytes of
    one value's mantissa: still finite); the header and the size stay as they were."""
    path = _tensor_shard(model, name)
    start, stop = checkpoint_module.data_ranges(path)[name]
    middle = start + (stop - start) // 8 * 4
    with open(path, "r+b") as f:
        f.seek(middle)
        low = f.read(2)
        f.seek(middle)
        f.write(bytes(b ^ 0x55 for b in low))


@pytest.fixture
def small_sample(monkeypatch):
    """The manifest's fingerprint samples 16 bytes at each end of a shard instead of a MiB:
    the tiny shards then have a middle that fingerprint cannot see, as a 5 GB shard does."""
    sample = checkpoint_module.data_sample_sha256
    monkeypatch.setattr(checkpoint_module, "data_sample_sha256",
                        lambda path, span=16: sample(path, span))  # fmt: skip


@pytest.mark.parametrize(
    "fault,tensor,reader",
    [
        ("between:2:eio", "model.layers.0.mlp.down_proj.weight", "block 1"),
        ("rest:eio", "model.embed_tokens.weight", "block 1's inputs"),  # the output's embedding
    ],
)
def test_a_checkpoint_changed_between_a_kill_and_the_rerun_is_refused(
    setup, tmp_path, monkeypatch, small_sample, fault, tensor, reader
):
    """A tensor that finished stages read changes in the middle of its shard, where the
    manifest's fingerprint does not look: the rerun refuses, naming the tensor, its shard and
    the stage that read it, and changes nothing; --restart then compresses the checkpoint as
    it is now, as a fresh run does."""
    model_before, calib, _ = setup
    model = tmp_path / "model"
    shutil.copytree(model_before, model)
    out, work = tmp_path / "out", tmp_path / "out.work"
    monkeypatch.setenv("STREAMSVD_FAULT", fault)
    with pytest.raises(StreamSVDError, match="injected"):
        compress(_config(model, calib, out, "svdllm-a"))
    monkeypatch.delenv("STREAMSVD_FAULT")
    _change_mid_tensor(model, tensor)
    before = (work / "journal.json").read_bytes()
    with pytest.raises(StreamSVDError) as info:
        compress(_config(model, calib, out, "svdllm-a"))
    shard = _tensor_shard(model, tensor).name
    assert f"the checkpoint changed since this run began: {tensor} (in {shard}) is not what " \
           f"{reader} read" in str(info.value)  # fmt: skip
    assert "--restart" in str(info.value)
    assert (work / "journal.json").read_bytes() == before and not out.exists()

    compress(_config(model, calib, out, "svdllm-a", restart=True))
    fresh = tmp_path / "fresh"
    compress(_config(model, calib, fresh, "svdllm-a"))
    assert output_hashes(out) == output_hashes(fresh)


def test_a_checkpoint_touched_or_copied_with_the_same_content_resumes(setup, tmp_path):
    """A shard whose stat changed (a new inode, a new mtime) but whose tensors are the ones
    finished stages read: hashed again, found the same, and the run resumes to the bytes
    of an uninterrupted run."""
    model_before, calib, reference = setup
    model = tmp_path / "model"
    shutil.copytree(model_before, model)
    out = tmp_path / "out"
    assert run_cli(model, calib, out, "svdllm-a", "between:2").returncode == KILLED
    for shard in sorted(model.glob("*.safetensors")):
        copy = shard.with_name(shard.name + ".copy")
        shutil.copyfile(shard, copy)
        os.replace(copy, shard)  # same bytes, another inode and mtime
    result = run_cli(model, calib, out, "svdllm-a")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is the same: going on" in result.stderr
    assert blocks_computed(result.stderr) == [3]
    assert output_hashes(out) == reference("svdllm-a")


def test_a_shard_is_hashed_as_written_not_read_back(tmp_path, monkeypatch):
    """save_shard's SHA-256 is the file's, though only its header is read back: the data's
    bytes are hashed from the tensors written (a bf16, a transposed, an empty and a
    0-d tensor among them)."""
    reads = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            data = self.f.read(*args)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def whole_file(path):
        raise AssertionError(f"{path} read back whole")

    monkeypatch.setattr(checkpoint_module, "open", lambda *a: Counted(open(*a)), raising=False)
    monkeypatch.setattr(checkpoint_module, "file_sha256", whole_file)
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 48, generator=gen).bfloat16(),
               "t": torch.randn(32, 16, generator=gen).T, "empty": torch.zeros(0, 4),
               "scale": torch.tensor(0.5, dtype=torch.float64),
               "q": torch.randint(-8, 8, (40,), generator=gen, dtype=torch.int8)}  # fmt: skip
    path = tmp_path / "x.safetensors"
    sha = save_shard(tensors, path)
    raw = path.read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert sum(reads) == header < len(raw)


def test_a_finished_shard_is_checked_by_its_stat_on_resume(setup, tmp_path, monkeypatch):
    """Resumed, a finished shard whose stat is as recorded is not read to hash it again;
    one whose stat changed (here only its times) is, and, the same, is kept."""
    from streamsvd import rundir as rundir_module

    model, calib, reference = setup
    out, shards = tmp_path / "out", tmp_path / "out.work" / "shards"
    hashed = []

    def file_sha256(path):
        hashed.append(Path(path).name)
        return checkpoint_module.file_sha256(path)

    monkeypatch.setattr(rundir_module, "file_sha256", file_sha256)

    def interrupted(fault: str) -> None:
        monkeypatch.setenv("STREAMSVD_FAULT", fault)
        with pytest.raises(StreamSVDError, match="no space left"):
            compress(_config(model, calib, out, "svdllm-a"))
        monkeypatch.delenv("STREAMSVD_FAULT")

    interrupted("between:1:enospc")  # block 1 done
    interrupted("between:2:enospc")  # resumed at block 2, which is then done
    assert hashed == []
    os.utime(shards / "block-00001.safetensors")  # the same bytes, new times (at once)
    compress(_config(model, calib, out, "svdllm-a"))
    assert hashed == ["block-00001.safetensors"]
    assert output_hashes(out) == reference("svdllm-a")
