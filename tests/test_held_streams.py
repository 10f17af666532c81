"""Refinement's streams held where the compute is (activations.HeldWindows, issue 42): a
block's windows are read from the store at most once when held, read ahead on a thread of
their own when streamed, the output is the same bytes either way (one process and two),
and the memory plan picks the place and accounts its bytes there. Writes to the store go
behind the compute, on a writer thread of their own, bounded, their errors raised where
the slot is next read or made durable."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from test_distributed import torchrun
from test_resume import output_hashes

from streamsvd import CompressConfig, compress
from streamsvd.activations import ActivationStore, HeldWindows
from streamsvd.errors import StreamSVDError
from streamsvd.plan import format_plan, make_plan, refine_held_bytes, refine_keep
from streamsvd.refine import micro_batches
from streamsvd.step import BlockStep

SETTINGS = dict(
    nsamples=8,
    seqlen=32,
    batch_size=4,
    ratio=0.4,
    seed=3,
    device="cpu",
    refine_lr=3e-3,
    refine_holdout=0,
)  # fmt: skip  (the holdout test sets its own)
EPOCHS = 3
GiB = 1 << 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_calib_text):
    root = tmp_path_factory.mktemp("held")
    model = write_checkpoint(root / "model", tiny_config(layers=2))
    return root, model, small_calib_text


def _compress(model, calib, out, **changes) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = {**SETTINGS, "refine_epochs": EPOCHS, **changes}
        return compress(CompressConfig(model=str(model), out=str(out), calib=str(calib),
                                       **settings))  # fmt: skip
    finally:
        torch.set_num_threads(before)


def _spied_reads(monkeypatch) -> list[tuple]:
    """Every store read made during a block's refinement: (refinement, stream, slot,
    start, stop, thread name), refinements numbered from 0 in the order they ran."""
    reads, refining = [], []
    read, refine = ActivationStore.read, BlockStep.refine

    def spy_read(self, stream, slot, start, stop):
        if refining:
            reads.append((refining[0], stream, slot, start, stop,
                          threading.current_thread().name))  # fmt: skip
        return read(self, stream, slot, start, stop)

    def spy_refine(self, *args, **kwargs):
        refining.append(self.index)
        try:
            return refine(self, *args, **kwargs)
        finally:
            refining.clear()

    monkeypatch.setattr(ActivationStore, "read", spy_read)
    monkeypatch.setattr(BlockStep, "refine", spy_refine)
    return reads


def test_held_streams_are_read_once_and_give_the_streamed_bytes(setup, monkeypatch):
    """Held in host memory (what the plan picks here, with memory to spare), each window
    of each stream is read from the store exactly once per block, on this thread; read from
    the store (--refine-streams store), each is read on every epoch (and the compressed
    stream once more, for the dense block's share of the target), on the read-ahead
    thread; the two outputs are the same bytes, and so are their losses."""
    root, model, calib = setup
    reads = _spied_reads(monkeypatch)
    held = _compress(model, calib, root / "held")
    held_reads, reads[:] = list(reads), []
    streamed = _compress(model, calib, root / "streamed", refine_streams="store")
    assert held["refine_streams"] == "host" and streamed["refine_streams"] == "store"
    assert output_hashes(root / "held") == output_hashes(root / "streamed")
    assert held["refine_losses"] == streamed["refine_losses"]

    steps = micro_batches([(0, 4), (4, 8)], held["refine"]["batch"])
    every = {(block, stream, slot, a, b) for block in (0, 1) for a, b in steps
             for stream, slot in (("comp", block % 2), ("orig", (block + 1) % 2))}  # fmt: skip
    counts = Counter(r[:5] for r in held_reads)
    assert set(counts) == every and set(counts.values()) == {1}
    assert {r[5] for r in held_reads} == {threading.current_thread().name}

    counts = Counter(r[:5] for r in reads)
    assert set(counts) == every
    assert {n for k, n in counts.items() if k[1] == "orig"} == {EPOCHS}
    assert {n for k, n in counts.items() if k[1] == "comp"} == {EPOCHS + 1}
    assert all(r[5].startswith("read-ahead") for r in reads)


def test_held_streams_with_a_holdout_give_the_streamed_bytes(setup):
    """Held-out scoring reads the held windows too: the same held-out losses, epoch kept
    and bytes as streaming them."""
    root, model, calib = setup
    runs = {keep: _compress(model, calib, root / f"holdout-{keep}", refine_holdout=2,
                            refine_streams=keep) for keep in ("host", "store")}  # fmt: skip
    assert runs["host"]["refine_losses"] == runs["store"]["refine_losses"]
    assert "heldout_closed_form" in runs["host"]["refine_losses"][0]
    assert output_hashes(root / "holdout-host") == output_hashes(root / "holdout-store")


def test_two_processes_give_the_same_bytes_held_or_streamed(setup, tmp_path):
    """Under torchrun (2 gloo processes) each rank holds its own windows, and the rank
    that holds a step's windows broadcasts them as when it read them from its store; ranks
    that keep them in different places (as --refine-streams auto may choose where their
    memory differs) give the same bytes too."""
    import json

    root, model, calib = setup
    outs, keeps = {}, {}
    for keep in ("host", "store", "mixed"):
        outs[keep] = tmp_path / keep
        entry = (str(Path(__file__).with_name("ranks_keep_apart.py")),) if keep == "mixed" else ()
        done = torchrun(model, calib, outs[keep], "--refine-epochs", "2", "--refine-streams",
                        "auto" if keep == "mixed" else keep, "--nsamples", "8",
                        "--summary-json", str(tmp_path / f"{keep}.json"),
                        **({"entry": entry} if entry else {}))  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((tmp_path / f"{keep}.json").read_text())
        keeps[keep] = [rank["refine_streams"] for rank in summary["per_process"]]
    assert keeps == {"host": ["host"] * 2, "store": ["store"] * 2, "mixed": ["host", "store"]}
    assert output_hashes(outs["host"]) == output_hashes(outs["store"])
    assert output_hashes(outs["mixed"]) == output_hashes(outs["store"])


def _windows(keep: str, reads: list) -> HeldWindows:
    data = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)

    def read(start, stop):
        reads.append((start, stop, threading.current_thread().name))
        return data[start:stop].clone()

    return HeldWindows({"x": read}, [(0, 2), (2, 4), (4, 6)], keep, torch.device("cpu"))


def test_held_windows_are_copies_and_streamed_ones_are_read_ahead():
    """A held window comes back as a tensor of its own (a block writing its input in place
    cannot change the next epoch's); a streamed one is read on the read-ahead thread when
    expected, on the caller's thread when not, with the same values."""
    reads = []
    with _windows("host", reads) as held:
        first = held("x", 2, 4)
        first.zero_()
        assert held("x", 2, 4).tolist() == [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
    assert [r[:2] for r in reads] == [(0, 2), (2, 4), (4, 6)]
    reads = []
    with _windows("store", reads) as streamed:
        streamed.expect([("x", 4, 6), ("x", 0, 2)])
        assert streamed("x", 4, 6).tolist() == [[12.0, 13.0, 14.0], [15.0, 16.0, 17.0]]
        assert streamed("x", 0, 2)[0].tolist() == [0.0, 1.0, 2.0]
        assert streamed("x", 2, 4)[0].tolist() == [6.0, 7.0, 8.0]  # not expected
    assert [r[:2] for r in reads] == [(4, 6), (0, 2), (2, 4)]
    assert [r[2].startswith("read-ahead") for r in reads] == [True, True, False]


class _HeldWriter:
    """Holds ActivationStore's writer thread in its part of `write` until released, and
    counts the micro-batches it has started storing."""

    def __init__(self, monkeypatch, error: OSError | None = None):
        self.release, self.entered, self.started = threading.Event(), threading.Event(), 0
        store_now = ActivationStore._store

        def held(store, *args):
            self.started += 1
            self.entered.set()
            assert self.release.wait(60), "the test never released the writer"
            if error is not None:
                raise error
            return store_now(store, *args)

        monkeypatch.setattr(ActivationStore, "_store", held)


def test_writes_go_behind_the_caller_and_store_what_it_passed(tmp_path, monkeypatch):
    """`write` returns while its micro-batch waits for the writer thread, holding a copy of
    its own (the caller may reuse its tensor); a read of the slot waits for the write, and
    the digest fed in the background is the stored bytes' (what a resume checks)."""
    import hashlib

    writer = _HeldWriter(monkeypatch)
    store = ActivationStore(tmp_path / "acts", 4, 3, 5, torch.bfloat16, durable=True)
    store.reset("orig", 1)
    digest = hashlib.sha256()
    values = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    expected = values.to(torch.bfloat16)
    store.write("orig", 1, 0, values[:2], digest)
    store.write("orig", 1, 2, values[2:], digest)  # returned: the writer is still held
    assert writer.entered.wait(60) and writer.started == 1
    values.zero_()  # the caller reuses its tensor before the writes are done
    writer.release.set()
    assert torch.equal(store.read("orig", 1, 0, 4), expected)
    store.sync("orig", 1)
    assert digest.hexdigest() == store.checksum("orig", 1)


def test_writes_in_flight_are_bounded(tmp_path, monkeypatch):
    """At most WRITES_IN_FLIGHT host copies wait for the writer: the next write waits for
    the oldest, so memory stays what the plan counts."""
    writer = _HeldWriter(monkeypatch)
    store = ActivationStore(tmp_path / "acts", 4, 3, 5, torch.float32)
    store.reset("orig", 0)
    limit = ActivationStore.WRITES_IN_FLIGHT
    returned = []

    def write_all():
        for k in range(limit + 1):
            store.write("orig", 0, k, torch.full((1, 3, 5), float(k)))
            returned.append(k)

    caller = threading.Thread(target=write_all)
    caller.start()
    assert writer.entered.wait(60)
    for _ in range(600):  # until the first `limit` writes have returned, however slowly
        if len(returned) >= limit:
            break
        caller.join(0.1)
    caller.join(0.1)  # the last write cannot return while the first is held
    assert caller.is_alive() and returned == list(range(limit))
    writer.release.set()
    caller.join(60)
    assert returned == list(range(limit + 1))
    assert store.read("orig", 0, 0, limit + 1)[:, 0, 0].tolist() == list(range(limit + 1))


def test_a_failed_write_raises_where_its_slot_is_read_or_made_durable(tmp_path, monkeypatch):
    """A write that fails behind the caller (a full disk) is not lost: the slot's next read
    or `sync` raises its error, so a block is never committed over activations not stored.
    A reset slot drops its failed writes with its files."""
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    writer = _HeldWriter(monkeypatch, error=full)
    writer.release.set()
    store = ActivationStore(tmp_path / "acts", 2, 3, 5, torch.float32, durable=True)
    for slot in (0, 1):
        store.reset("comp", slot)
        store.write("comp", slot, 0, torch.ones(2, 3, 5))
    with pytest.raises(OSError, match="No space"):
        store.sync("comp", 0)
    with pytest.raises(OSError, match="No space"):
        store.read("comp", 1, 0, 2)
    store.write("comp", 0, 0, torch.ones(2, 3, 5))
    store.reset("comp", 0)
    assert store.read("comp", 0, 0, 2).abs().sum() == 0


def test_the_plan_holds_the_streams_where_they_fit_and_counts_them_there(setup):
    """The device first, then host memory, else the store; the bytes held go to the phase
    where they live, and --dry-run says where."""
    host = {"setup": 3 * GiB, "refine": 11 * GiB // 4}  # 2.75 GiB
    device = {"statistics": 9 * GiB // 2, "refine": 4 * GiB}
    cfg = CompressConfig(model="m", out="o", device="cuda")
    cases = [({"host": (4 * GiB, ""), "device": (5 * GiB, "")}, "device"),  # 4 + 1 fits
             ({"host": (4 * GiB, ""), "device": (19 * GiB // 4, "")}, "host"),  # 2.75 + 1
             ({"host": (7 * GiB // 2, ""), "device": (19 * GiB // 4, "")}, "store")]  # fmt: skip
    for have, where in cases:
        h, d = dict(host), dict(device)
        assert refine_keep(cfg, h, d, GiB, have) == where
        assert d["refine"] == device["refine"] + GiB * (where == "device")
        assert h["refine"] == host["refine"] + GiB * (where == "host")

    root, model, calib = setup
    fixed = {"peak": 0, "after": 0}
    plans = {}
    for keep in ("host", "store"):
        cfg = CompressConfig(model=str(model), out=str(root / "plan"), calib=str(calib),
                             refine_streams=keep, **SETTINGS)  # fmt: skip
        plans[keep] = make_plan(cfg, fixed, timing=False)
    held = refine_held_bytes(cfg, 64, torch.float32)  # hidden 64, float32 on a CPU
    assert held == 2 * 8 * 32 * 64 * 4
    assert plans["host"].host_phases["refine"] - plans["store"].host_phases["refine"] == held
    assert "held in host memory" in format_plan(plans["host"])
    assert "read from the store on every epoch" in format_plan(plans["store"])
    auto = dataclasses.replace(cfg, refine_streams="auto")
    little = make_plan(auto, fixed, timing=False, have={"host": (held, "tiny")})
    assert little.refine_streams == "store"
    gpu = dataclasses.replace(auto, device="cuda")  # planned here as with --device-memory
    roomy = {"host": (GiB, ""), "device": (GiB, "")}
    on_gpu = {keep: make_plan(dataclasses.replace(gpu, refine_streams=keep), fixed,
                              timing=False, have=roomy) for keep in ("auto", "store")}  # fmt: skip
    assert on_gpu["auto"].refine_streams == "device"
    assert on_gpu["auto"].device_phases["refine"] - on_gpu["store"].device_phases["refine"] == held
    assert "held on the device" in format_plan(on_gpu["auto"])


def test_refine_streams_device_needs_a_gpu(tmp_path):
    with pytest.raises(StreamSVDError, match="refine-streams"):
        CompressConfig(model="m", out=str(tmp_path / "o"), refine_streams="device")
    with pytest.raises(StreamSVDError, match="refine-streams"):
        CompressConfig(model="m", out=str(tmp_path / "o"), refine_streams="disk")
