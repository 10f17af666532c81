"""Refinement's streams held where the compute is (activations.HeldWindows, issue 42): a
block's windows are read from the store at most once when held, read ahead on a thread of
their own when streamed, the output is the same bytes either way (one process and two),
and the memory plan picks the place and accounts its bytes there."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter

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

SETTINGS = dict(nsamples=8, seqlen=32, batch_size=4, ratio=0.4, seed=3, device="cpu",
                refine_lr=3e-3)  # fmt: skip
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
    that holds a step's windows broadcasts them as when it read them from its store."""
    root, model, calib = setup
    outs = {}
    for keep in ("host", "store"):
        outs[keep] = tmp_path / keep
        done = torchrun(model, calib, outs[keep], "--refine-epochs", "2", "--refine-streams",
                        keep, "--nsamples", "8")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert output_hashes(outs["host"]) == output_hashes(outs["store"])


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
