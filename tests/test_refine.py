"""Block refinement (streamsvd/refine.py): it lowers a block's output error against the
dense block, it trains only what it says, a compress run with it is deterministic and
resumes to the same bytes after a kill mid-refinement, and it works from any method. With
held-out windows (--refine-holdout) it never leaves a block worse on them than its closed
form, and declines to change a block where no epoch beats it."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from test_resume import KILLED, blocks_computed, output_hashes, run_cli
from test_resume import _config as resume_config

from streamsvd import CompressConfig, compress, load_compressed
from streamsvd.errors import StreamSVDError
from streamsvd.factorize import plain_svd, rank_for
from streamsvd.modeling import LowRankLinear, replace_module
from streamsvd.refine import (
    DEFAULT_BATCH,
    RefineSettings,
    held_out_steps,
    micro_batches,
    piece_sizes,
    rank_piece,
    refine_block,
    trainable_names,
)

SETTINGS = dict(nsamples=8, seqlen=32, batch_size=4, ratio=0.4, seed=3, device="cpu")


def _block_and_arguments(batch: int, seqlen: int):
    """Block 0 of a tiny random Llama, in float32, and its keyword arguments."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(layers=1)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    x = torch.randn(batch, seqlen, model.config.hidden_size)
    positions = torch.arange(seqlen)[None].expand(batch, seqlen)
    arguments = {"position_embeddings": model.model.rotary_emb(x, positions),
                 "attention_mask": None}  # fmt: skip
    return model.model.layers[0], arguments, x


def _low_rank(block, ratio: float):
    """The block with every linear replaced by its plain truncated SVD."""
    block = copy.deepcopy(block)
    for name, module in list(block.named_modules()):
        if isinstance(module, torch.nn.Linear):
            rank = rank_for(*module.weight.shape, ratio)
            A, B = plain_svd(module.weight.detach(), None, rank)
            replace_module(block, name, LowRankLinear.from_factors(A, B, module.bias,
                                                                   torch.float32))  # fmt: skip
    return block


def _output(block, x, arguments):
    with torch.no_grad():
        out = block(x, **arguments)
    return out[0] if isinstance(out, tuple) else out


def test_refinement_lowers_the_block_output_error_against_the_dense_block():
    """Fed perturbed inputs X′ (what a compressed model's earlier blocks hand on), the
    refined block's outputs are closer to dense(X) than the truncated SVD's, both on the
    batches it trained on and on held-out ones; and made in inference mode, as the run
    makes blocks, the block still trains."""
    batch, seqlen = 32, 32  # 1,024 training tokens, more targets than the factors hold
    dense, arguments, x = _block_and_arguments(2 * batch, seqlen)
    x_comp = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    target = _output(dense, x, arguments)
    with torch.inference_mode():
        block = _low_rank(dense, 0.5)
        cos, sin = arguments["position_embeddings"]
        split = {4: {"position_embeddings": (cos[:4].clone(), sin[:4].clone()),
                     "attention_mask": None}}  # fmt: skip
    before = _output(block, x_comp, arguments)
    batches = [(s, s + 4) for s in range(0, batch, 4)]  # trains on the first half only
    info = refine_block(block, split, batches, lambda a, b: x_comp[a:b], lambda a, b: target[a:b],
                        RefineSettings(epochs=10, lr=1e-3), 0, torch.float32)  # fmt: skip
    after = _output(block, x_comp, arguments)

    def error(out, rows):
        return float((out[rows] - target[rows]).pow(2).mean())

    trained, held_out = slice(0, batch), slice(batch, 2 * batch)
    assert error(after, trained) < error(before, trained)
    assert error(after, held_out) < error(before, held_out)
    assert info["loss_last_epoch"] < info["loss_first_epoch"]
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in block.parameters())


def test_only_factors_are_trained_unless_norms_are_asked_for():
    dense, arguments, x = _block_and_arguments(4, 8)
    block = _low_rank(dense, 0.5)
    factors = trainable_names(block, norms=False)
    assert factors and all(n.endswith(("down.weight", "up.weight")) for n in factors)
    with_norms = trainable_names(block, norms=True)
    assert set(with_norms) - set(factors) == {"input_layernorm.weight",
                                              "post_attention_layernorm.weight"}  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in block.named_parameters() if n not in factors}
    refine_block(block, {4: arguments}, [(0, 4)], lambda a, b: x[a:b],
                 lambda a, b: _output(dense, x, arguments)[a:b], RefineSettings(epochs=2, lr=1e-2),
                 0, torch.float32)  # fmt: skip
    for name, value in frozen.items():
        assert torch.equal(block.get_parameter(name), value), name


def test_trained_values_are_rounded_to_the_output_dtype():
    """The block goes on to run what is written: bfloat16 values, in its compute dtype."""
    dense, arguments, x = _block_and_arguments(4, 8)
    block = _low_rank(dense, 0.5)
    refine_block(block, {4: arguments}, [(0, 4)], lambda a, b: x[a:b],
                 lambda a, b: _output(dense, x, arguments)[a:b], RefineSettings(epochs=1),
                 0, torch.bfloat16)  # fmt: skip
    for name in trainable_names(block, norms=False):
        value = block.get_parameter(name)
        assert value.dtype == torch.float32
        assert torch.equal(value, value.to(torch.bfloat16).float()), name


class _Products(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtype of every matrix product's operands (the first two tensors: attention's
    backward also takes float32 log-sum-exps), in the order the products ran."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "bmm", "baddbmm") or "scaled_dot_product" in name:
            operands = [a.dtype for a in args if isinstance(a, torch.Tensor)][:2]
            self.dtypes.append(operands[0] if len(set(operands)) == 1 else tuple(operands))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("holdout", [0, 4])
def test_bfloat16_refinement_multiplies_in_bf16_and_trains_float32_factors(holdout):
    """--refine-precision bfloat16: every matrix product of training (forward and
    backward) takes bf16 operands (torch's autocast), the held-out score's forwards take
    float32 ones, and the factors train in float32 and end in their dtype, as in float32
    refinement, which multiplies in float32 throughout; the block's error still falls."""
    batch, seqlen, epochs = 16, 16, 3
    dense, arguments, x = _block_and_arguments(batch, seqlen)
    x_comp = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    target = _output(dense, x, arguments)
    split = {4: {"position_embeddings": tuple(t[:4].clone() for t in
                                              arguments["position_embeddings"]),
                 "attention_mask": None}}  # fmt: skip
    with _Products() as one_forward:
        _output(_low_rank(dense, 0.5), x_comp[:4], split[4])
    products = {}
    for precision in ("float32", "bfloat16"):
        block = _low_rank(dense, 0.5)
        before = _output(block, x_comp, arguments)
        settings = RefineSettings(epochs=epochs, lr=1e-3, holdout=holdout, precision=precision)
        with _Products() as record:
            info = refine_block(block, split, [(s, s + 4) for s in range(0, batch, 4)],
                                lambda a, b: x_comp[a:b], lambda a, b: target[a:b], settings, 0,
                                torch.float32)  # fmt: skip
        products[precision] = record.dtypes
        assert info["loss_last_epoch"] < info["loss_first_epoch"]
        if not holdout:  # (with one, the closed form may be kept)
            after = _output(block, x_comp, arguments)
            assert (after - target).pow(2).mean() < (before - target).pow(2).mean()
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in block.parameters())
    assert set(products["float32"]) == {torch.float32}
    assert len(products["bfloat16"]) == len(products["float32"])  # the same products
    scoring = (epochs + 1) * len(one_forward.dtypes) if holdout else 0  # before, after each
    assert products["bfloat16"].count(torch.float32) == scoring
    assert products["bfloat16"].count(torch.bfloat16) == len(products["bfloat16"]) - scoring


def test_a_float64_block_refines_in_float64_whatever_the_precision_asked():
    """bf16 autocast would round a float64 block's values, which refinement keeps."""
    dense, arguments, x = _block_and_arguments(4, 8)
    block = _low_rank(dense, 0.5).double()
    arguments = {k: tuple(t.double() for t in v) if isinstance(v, tuple) else v
                 for k, v in arguments.items()}  # fmt: skip
    target = _output(dense.double(), x.double(), arguments)
    with _Products() as record:
        refine_block(block, {4: arguments}, [(0, 4)], lambda a, b: x.double()[a:b],
                     lambda a, b: target[a:b], RefineSettings(epochs=1, precision="bfloat16"),
                     0, torch.float64)  # fmt: skip
    assert record.dtypes and set(record.dtypes) == {torch.float64}


def test_held_out_steps_are_whole_steps_at_the_end():
    steps = micro_batches([(0, 4), (4, 8), (8, 11)], 2)  # 2, 2, 2, 2, 2, 1 windows
    assert [held_out_steps(steps, n) for n in (0, 1, 3, 5, 9)] == [0, 1, 2, 3, 5]
    for bad in (2, 4, 11, 12):  # not whole steps; every window, none left to train on
        with pytest.raises(StreamSVDError, match="choose one of 1, 3, 5, 7, 9"):
            held_out_steps(steps, bad)


def _heldout_case(windows: int, seqlen: int, lr: float, epochs: int, holdout: int):
    """A low-rank block refined on 2-window steps of its first windows, `holdout` held out,
    fed perturbed inputs X′ towards the dense block's outputs on X; with the closed form's
    parameters, the settings' result, and the held-out error of a block (as refinement
    scores it: per 2-window step, weighted by windows)."""
    dense, arguments, x = _block_and_arguments(windows, seqlen)
    x_comp = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    target = _output(dense, x, arguments)
    cos, sin = arguments["position_embeddings"]
    split = {2: {"position_embeddings": (cos[:2].clone(), sin[:2].clone()),
                 "attention_mask": None}}  # fmt: skip
    with torch.inference_mode():
        block = _low_rank(dense, 0.5)
    closed_form = {n: p.detach().clone() for n, p in block.named_parameters()}
    reads = []  # (first window, whether gradients were on)

    def read_inputs(a, b):
        reads.append((a, torch.is_grad_enabled()))
        return x_comp[a:b]

    steps = [(s, s + 2) for s in range(0, windows, 2)]
    info = refine_block(block, split, steps, read_inputs, lambda a, b: target[a:b],
                        RefineSettings(epochs=epochs, lr=lr, batch=2, holdout=holdout), 0,
                        torch.float32)  # fmt: skip

    def heldout_error(module) -> float:
        held = steps[len(steps) - holdout // 2 :]
        total = sum(float((_output(module, x_comp[a:b], split[2]) - target[a:b]).pow(2).mean())
                    * (b - a) for a, b in held)  # fmt: skip
        return total / holdout

    return block, closed_form, info, reads, heldout_error


def test_refinement_that_hurts_on_held_out_windows_is_declined():
    """Trained on 4 windows at lr 1e-1, every epoch leaves the block worse on the 8 held
    out than its closed form (as sixteen epochs on eight windows left SmolLM2 worse than no
    refinement): refinement is declined, and the block is the closed form's, byte for
    byte, so no worse on the held-out windows."""
    windows, holdout, epochs = 12, 8, 12
    block, closed_form, info, _, heldout_error = _heldout_case(windows, 16, 1e-1, epochs,
                                                               holdout)  # fmt: skip
    losses = info["heldout_loss"]
    assert len(losses) == epochs + 1 and min(losses[1:]) > losses[0]
    assert info["kept_epoch"] == 0 and info["trained"] == []
    for name, value in block.named_parameters():
        assert value.dtype == closed_form[name].dtype
        assert torch.equal(value, closed_form[name]), name
    with torch.inference_mode():
        reference = _low_rank(_block_and_arguments(windows, 16)[0], 0.5)
    assert heldout_error(block) == heldout_error(reference)


def test_the_best_epoch_on_held_out_windows_is_kept_not_the_last():
    """At lr 1e-3 on 4 windows the held-out loss falls for an epoch or two, then rises as
    the block overfits: an epoch between the first and the last is kept, its held-out
    error below the closed form's and the last epoch's. The held-out windows are read
    only without gradients: never trained on."""
    windows, holdout, epochs = 12, 8, 8
    block, closed_form, info, reads, heldout_error = _heldout_case(windows, 16, 1e-3, epochs,
                                                                   holdout)  # fmt: skip
    losses, kept = info["heldout_loss"], info["kept_epoch"]
    assert 0 < kept < epochs and losses[kept] == min(losses)
    assert losses[kept] < losses[0] and losses[kept] < losses[-1]
    assert info["trained"] == trainable_names(block, norms=False)
    # the block holds the kept epoch's factors: its held-out error is the one recorded, up
    # to float32 summation order (a few units of 2⁻²⁴)
    assert heldout_error(block) == pytest.approx(losses[kept], rel=1e-6)
    with torch.inference_mode():
        reference = _low_rank(_block_and_arguments(windows, 16)[0], 0.5)
    assert heldout_error(block) < heldout_error(reference)
    assert any(not torch.equal(p, closed_form[n]) for n, p in block.named_parameters())
    first_held = windows - holdout
    assert {a for a, grad in reads if grad} == set(range(0, first_held, 2))
    assert {a for a, grad in reads if not grad} == set(range(first_held, windows, 2))


def test_micro_batches_cut_every_batch_into_steps_covering_it_once():
    batches = [(0, 8), (8, 16), (16, 19)]
    assert micro_batches(batches, 8) == batches
    assert micro_batches(batches, 20) == batches
    assert micro_batches(batches, 3) == [(0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16),
                                         (16, 19)]  # fmt: skip
    one = micro_batches(batches, 1)
    assert one == [(k, k + 1) for k in range(19)]


def test_bad_refinement_settings_are_refused(tmp_path):
    bad_settings = (
        dict(refine_epochs=-1),
        dict(refine_lr=0.0),
        dict(refine_lr=float("nan")),
        dict(refine_epochs=1, refine_batch=0),
        dict(refine_epochs=1, refine_batch=9),  # more windows than a calibration batch
        dict(refine_holdout=-1),
        dict(refine_epochs=0, refine_holdout=2),  # nothing to hold out from
        dict(nsamples=8, batch_size=4, refine_holdout=8),  # nothing left to train on
        dict(nsamples=8, batch_size=4, refine_holdout=3),  # 2-window steps: not whole steps
        dict(nsamples=7, batch_size=4, refine_batch=4, refine_holdout=4),  # the last step: 3
        dict(refine_precision="float16"),  # bf16 or float32 only
    )
    for bad in bad_settings:
        with pytest.raises(StreamSVDError, match="refine"):
            CompressConfig(model="m", out=str(tmp_path / "o"), **bad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_calib_text):
    root = tmp_path_factory.mktemp("refine")
    model = write_checkpoint(root / "model", tiny_config(layers=3))
    return root, model, small_calib_text


def _compress(model, calib, out, **changes):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    try:
        return compress(CompressConfig(model=str(model), out=str(out), calib=str(calib),
                                       **{**SETTINGS, **changes}))  # fmt: skip
    finally:
        torch.set_num_threads(before)


def _logit_error(model_dir, reference, windows):
    got = load_compressed(model_dir).double()
    with torch.no_grad():
        return float((got(windows).logits - reference).pow(2).mean())


def _calibration_reference(model, calib):
    """The run's calibration windows and the original model's float64 logits on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamsvd.calib import calibration_windows, tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(model), calib.read_text())
    windows = calibration_windows(ids, SETTINGS["nsamples"], SETTINGS["seqlen"], SETTINGS["seed"])
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    with torch.no_grad():
        return windows, original(windows).logits


def test_refined_compression_is_closer_to_the_original_and_deterministic(setup):
    """On the calibration windows the refined model's logits are closer to the original's
    than the closed form's; two CPU runs give the same bytes."""
    root, model, calib = setup
    closed = _compress(model, calib, root / "closed", refine_epochs=0)
    settings = dict(refine_epochs=8, refine_lr=3e-3, refine_batch=4)  # 16 steps a block
    refined = _compress(model, calib, root / "refined", **settings)
    again = _compress(model, calib, root / "again", **settings)
    assert output_hashes(root / "refined") == output_hashes(root / "again")
    assert refined["refine"]["epochs"] == 8 and closed["refine"]["epochs"] == 0
    assert refined["stage_seconds"]["refine"] > 0
    windows, reference = _calibration_reference(model, calib)
    assert _logit_error(root / "refined", reference, windows) < _logit_error(
        root / "closed", reference, windows
    )
    assert again["seconds"] > 0


def test_bfloat16_refinement_is_deterministic_and_says_its_precision(setup):
    """A compress run refined in bf16 autocast gives the same bytes twice on a CPU, other
    bytes than float32 refinement, and its config says the precision it trained in."""
    root, model, calib = setup
    settings = dict(refine_epochs=2, refine_lr=3e-3, refine_batch=4)
    bf16 = [root / f"bf16-{k}" for k in range(2)]
    for out in bf16:
        _compress(model, calib, out, refine_precision="bfloat16", **settings)
    _compress(model, calib, root / "fp32", **settings)
    assert output_hashes(bf16[0]) == output_hashes(bf16[1])
    assert output_hashes(bf16[0]) != output_hashes(root / "fp32")
    said = [json.loads((out / "config.json").read_text())["streamsvd"]["refine"]["precision"]
            for out in (bf16[0], root / "fp32")]  # fmt: skip
    assert said == ["bfloat16", "float32"]


@pytest.mark.parametrize("native", [True, False, None])
def test_bfloat16_refinement_on_a_cpu_without_native_bf16_is_warned_about(native, monkeypatch,
                                                                          caplog):  # fmt: skip
    from streamsvd import prepare

    monkeypatch.setattr(prepare, "native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="streamsvd.prepare"):
        prepare.warn_slow_bf16()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (native is False)
    assert all("--refine-precision float32 is faster" in m for m in warned)


def test_refinement_steps_are_cut_from_the_batches_as_asked(setup, monkeypatch):
    """--refine-batch 1 from batches of 4: four times the optimiser steps, each of 1 window,
    every block's training loss falls, and the output's config and the summary say what
    was run. (Whether smaller steps beat the closed form is a question of settings,
    measured on held-out text in benchmarks/, not a property to test.)"""
    import streamsvd.refine as refine

    root, model, calib = setup
    steps = []
    take_step = refine._take_step

    def counted(*args, windows):
        steps.append(windows)
        take_step(*args, windows=windows)

    monkeypatch.setattr(refine, "_take_step", counted)
    settings = dict(refine_epochs=8, refine_lr=3e-3)
    closed = _compress(model, calib, root / "closed-2", refine_epochs=0)
    small = _compress(model, calib, root / "steps-1", refine_batch=1, refine_holdout=0,
                      **settings)  # fmt: skip
    blocks, nsamples = 3, SETTINGS["nsamples"]
    assert steps == [1] * (blocks * settings["refine_epochs"] * nsamples)
    assert small["refine"]["batch"] == 1
    assert closed["refine"]["batch"] == min(DEFAULT_BATCH, SETTINGS["batch_size"])
    config = json.loads((root / "steps-1" / "config.json").read_text())
    assert config["streamsvd"]["refine"]["batch"] == 1
    losses = small["refine_losses"]
    assert [r["block"] for r in losses] == [0, 1, 2]
    assert all(r["last_epoch"] < r["first_epoch"] for r in losses), losses


def test_refinement_from_plain_svd_carries_both_streams(setup):
    """A method that takes no statistics still gets the original stream's outputs (the
    target) and the compressed stream's inputs, and the refined factors differ from the
    plain SVD's."""
    root, model, calib = setup
    plain = _compress(model, calib, root / "plain", method="svd", refine_epochs=0)
    refined = _compress(model, calib, root / "plain-refined", method="svd", refine_epochs=2)
    assert plain["params_after"] == refined["params_after"]
    assert output_hashes(root / "plain") != output_hashes(root / "plain-refined")


def test_killed_during_refinement_resumes_to_identical_bytes(setup, tmp_path):
    """Killed in block 1's refinement, then in block 2's: the rerun redoes block 2 alone
    and ends with the bytes of a run never interrupted (test_resume's settings)."""
    root, model, calib = setup
    reference = root / "reference-resume"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run
    try:
        compress(resume_config(model, calib, reference, "svdllm-a", refine_epochs=2))
    finally:
        torch.set_num_threads(before)
    out, refine = tmp_path / "out", ("--refine-epochs", "2")
    for fault in ("refine:0", "refine:1"):
        killed = run_cli(model, calib, out, "svdllm-a", fault, extra=refine)
        assert killed.returncode == KILLED, killed.stderr[-3000:]
    resumed = run_cli(model, calib, out, "svdllm-a", extra=refine)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at block 2/3" in resumed.stderr
    assert blocks_computed(resumed.stderr) == [2, 3]
    assert output_hashes(out) == output_hashes(reference)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_ranks_split_every_step_into_pieces_that_cover_it_once(ranks):
    """Under torchrun each step's windows are dealt out to the ranks (refine_block): the
    pieces tile the step, in rank order, with sizes that differ by at most one, so the
    averaged gradient is the one process's mean over the same windows."""
    steps = micro_batches([(0, 4), (4, 8), (8, 11)], 2) + [(20, 27)]
    seen = set()
    for start, stop in steps:
        pieces = [rank_piece(start, stop, r, ranks) for r in range(ranks)]
        assert pieces[0][0] == 0 and pieces[-1][1] == stop - start
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
        sizes = [b - a for a, b in pieces]
        assert max(sizes) - min(sizes) <= 1
        seen |= {n for n in sizes if n}
    assert piece_sizes(steps, ranks) == seen  # the block gets arguments for each


def test_no_holdout_trains_on_every_window_and_scores_none(setup, monkeypatch):
    """--refine-holdout 0 (the default from REFINE_MIN_WINDOWS windows) trains every step
    every epoch, scores nothing, and the summary's rows are the plain ones; without
    refinement the default holds nothing out (the bytes of a run that says 0)."""
    import streamsvd.refine as refine

    root, model, calib = setup
    steps = []
    take_step = refine._take_step

    def counted(*args, windows):
        steps.append(windows)
        take_step(*args, windows=windows)

    def never(*args):
        raise AssertionError("scored held-out windows without a holdout")

    monkeypatch.setattr(refine, "_take_step", counted)
    monkeypatch.setattr(refine, "_heldout_loss", never)
    settings = dict(refine_epochs=2, refine_lr=3e-3)
    zero = _compress(model, calib, root / "holdout-0", refine_holdout=0, **settings)
    blocks, step_windows = 3, min(DEFAULT_BATCH, SETTINGS["batch_size"])
    nsamples = SETTINGS["nsamples"]
    assert steps == [step_windows] * (blocks * settings["refine_epochs"] * nsamples
                                      // step_windows)  # fmt: skip
    assert "refine_declined" not in zero
    assert [set(r) for r in zero["refine_losses"]] == [
        {"block", "first_epoch", "last_epoch"}
    ] * blocks
    closed = {"refine_epochs": 0}
    _compress(model, calib, root / "closed-unnamed", **closed)
    _compress(model, calib, root / "closed-0", refine_holdout=0, **closed)
    assert output_hashes(root / "closed-unnamed") == output_hashes(root / "closed-0")


@pytest.mark.parametrize(
    "nsamples, batch, held",
    [(64, 2, 0), (32, 2, 0), (16, 2, 4), (8, 2, 2), (8, 4, 0), (4, 2, 0), (12, 4, 0), (20, 4, 4)],
)
def test_the_default_holdout_guards_too_little_calibration_alone(nsamples, batch, held):
    """Held out by default only below REFINE_MIN_WINDOWS (from there holding out lost on P1
    and held-out text): the most whole steps at the end within a quarter of the windows
    (none where one step is more than that); none without refinement; a number asked for
    is kept."""
    from streamsvd.refine import REFINE_MIN_WINDOWS, holdout_windows, micro_batches

    steps = micro_batches([(k, min(k + 4, nsamples)) for k in range(0, nsamples, 4)], batch)
    assert REFINE_MIN_WINDOWS == 32
    assert holdout_windows(None, 16, steps) == held
    assert holdout_windows(None, 0, steps) == 0
    assert holdout_windows(6, 16, steps) == 6


def test_holdout_runs_repeat_their_bytes_and_say_what_each_block_kept(setup, caplog):
    """Two runs holding out the last 2 of 8 windows give the same bytes; each block's
    kept factors score no worse on them than its closed form; the summary counts the
    blocks that declined, the log says per block what was kept, the output's config
    records the holdout."""
    root, model, calib = setup
    caplog.set_level(logging.INFO, logger="streamsvd")
    settings = dict(refine_epochs=4, refine_lr=3e-3, refine_holdout=2)
    first = _compress(model, calib, root / "holdout-2", **settings)
    again = _compress(model, calib, root / "holdout-2-again", **settings)
    assert output_hashes(root / "holdout-2") == output_hashes(root / "holdout-2-again")
    rows = first["refine_losses"]
    assert rows == again["refine_losses"] and [r["block"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["kept_epoch"] <= settings["refine_epochs"]
        assert r["heldout_kept"] <= r["heldout_closed_form"]
        assert (r["heldout_kept"] < r["heldout_closed_form"]) == (r["kept_epoch"] > 0)
    assert first["refine_declined"] == sum(r["kept_epoch"] == 0 for r in rows)
    said = [m for m in caplog.messages if "refinement kept epoch" in m or "declined:" in m]
    assert len(said) == 2 * 3  # each block, each run
    config = json.loads((root / "holdout-2" / "config.json").read_text())
    assert config["streamsvd"]["refine"]["holdout"] == 2


def test_blocks_that_decline_are_written_as_the_closed_form(setup, caplog):
    """At lr 1e-1 every epoch of every block loses on the held-out windows: each block
    declines, and the output's tensors are the closed form's, byte for byte (the next
    block's compressed stream came from the closed form too); the run says once that
    most blocks declined."""
    root, model, calib = setup
    caplog.set_level(logging.INFO, logger="streamsvd")
    _compress(model, calib, root / "decline-closed", refine_epochs=0)
    declined = _compress(model, calib, root / "declined", refine_epochs=4, refine_lr=1e-1,
                         refine_holdout=4)  # fmt: skip
    assert declined["refine_declined"] == 3
    assert all(r["kept_epoch"] == 0 for r in declined["refine_losses"])

    def tensors(out):
        return {k: v for k, v in output_hashes(root / out).items() if ":" in k}

    assert tensors("declined") == tensors("decline-closed")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "declined" in r.msg]
    assert len(warned) == 1 and "3 of 3 blocks" in warned[0].getMessage()


# run under torchrun: records what every rank's refinement kept, then compresses as the CLI
_RECORDING_RUN = """
import json, os, sys
import streamsvd.step as step
from streamsvd.cli import main

refine_block = step.refine_block

def recorded(*args, **kwargs):
    info = refine_block(*args, **kwargs)
    with open(os.path.join(os.environ["KEPT_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps({k: info[k] for k in ("heldout_loss", "kept_epoch")}) + "\\n")
    return info

step.refine_block = recorded
sys.exit(main())
"""


def test_two_ranks_keep_the_same_epoch(setup, tmp_path):
    """Under torchrun (2 gloo processes) each rank scores its piece of every held-out step
    and the losses are summed over the ranks: every rank records the same held-out losses,
    to the bit, and keeps the same epoch of every block."""
    root, model, calib = setup
    script = tmp_path / "recording_run.py"
    script.write_text(_RECORDING_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEPT_DIR": str(tmp_path)}
    env.pop("STREAMSVD_FAULT", None)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(script), "compress", "--model", str(model), "--out", str(tmp_path / "out"),
            "--calib", str(calib), "--refine-epochs", "3", "--refine-lr", "3e-3",
            "--refine-holdout", "3", "--refine-batch", "3"]  # fmt: skip
    for key, value in {**SETTINGS, "nsamples": 12, "batch_size": 6}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]
    assert all(len(json.loads(line)["heldout_loss"]) == 3 + 1 for line in ranks[0])


def test_a_refinement_step_never_waits_for_the_host(monkeypatch):
    """Each step's loss and overflow check stay on the device (refine._Tally) and are read
    once per pass: streamsvd's host reads of tensor values (`.item()`, `bool()`) do not grow
    with the steps, so on CUDA the steps queue without waiting. (torch's AdamW reads its
    step counters, which live on the host unless `capturable`: no device wait.)"""
    dense, arguments, x = _block_and_arguments(16, 8)
    target = _output(dense, x, arguments)
    reads = {"item": 0, "bool": 0}
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def counted(name, fn):
        def wrapper(self, *args):
            caller = sys._getframe(1).f_code.co_filename
            reads[name] += os.path.join("streamsvd", "") in caller  # streamsvd's, not torch's
            return fn(self, *args)

        return wrapper

    def run(steps: int) -> dict:
        block = _low_rank(dense, 0.5)
        reads.update(item=0, bool=0)
        monkeypatch.setattr(torch.Tensor, "item", counted("item", item))
        monkeypatch.setattr(torch.Tensor, "__bool__", counted("bool", to_bool))
        size = 16 // steps
        batches = [(s, s + size) for s in range(0, 16, size)]
        info = refine_block(block, {size: {**arguments, "position_embeddings": tuple(
            t[:size] for t in arguments["position_embeddings"])}}, batches,
            lambda a, b: x[a:b], lambda a, b: target[a:b], RefineSettings(epochs=3, lr=1e-3),
            0, torch.float32)  # fmt: skip
        monkeypatch.undo()
        return {**reads, "info": info}

    few, many = run(2), run(8)
    assert many["item"] == few["item"] and many["bool"] == few["bool"], (few, many)
    assert few["item"] <= 3 * 2  # the epochs' losses (first and last read at most twice)
    assert many["info"]["loss_last_epoch"] < many["info"]["loss_first_epoch"]
