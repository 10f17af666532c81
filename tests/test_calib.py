"""Calibration windows: P1's offsets, and BOS-led windows for tokenizers that add BOS."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import _load_tokenizer
from transformers import PreTrainedTokenizerFast

from streamsvd.calib import calibration_windows, leading_bos
from streamsvd.pipeline import CompressConfig
from streamsvd.prepare import prepare
from streamsvd.world import World


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tests' BPE with a <bos> it puts before every text, as Llama's and Gemma's do."""
    from tokenizers import processors

    backend = _load_tokenizer()
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


def test_bos_windows_take_p1s_offsets():
    ids = torch.arange(5000)
    plain = calibration_windows(ids, 6, 32, seed=0)
    led = calibration_windows(ids, 6, 32, seed=0, bos=4999)
    assert led.shape == plain.shape == (6, 32)
    assert (led[:, 0] == 4999).all()
    assert torch.equal(led[:, 1:], plain[:, :-1])  # the same text after BOS


def test_leading_bos_only_where_the_tokenizer_adds_it():
    with_bos = bos_tokenizer()
    assert leading_bos(with_bos) == with_bos.bos_token_id is not None
    plain = PreTrainedTokenizerFast(tokenizer_object=_load_tokenizer(), eos_token="<eos>")
    assert leading_bos(plain) is None
    # a BOS token it does not add (SmolLM2's <|im_start|>) does not count
    plain_named = PreTrainedTokenizerFast(tokenizer_object=_load_tokenizer(), bos_token="<eos>",
                                          eos_token="<eos>")  # fmt: skip
    assert leading_bos(plain_named) is None


@pytest.mark.parametrize("asked", [None, True, False])
def test_run_calibrates_as_the_tokenizer_starts_texts(tiny_model, small_calib_text, tmp_path,
                                                      asked):  # fmt: skip
    """Default: BOS-led windows when the tokenizer adds BOS, recorded in the manifest (a
    resumed run must match); --no-bos-windows keeps P1's windows."""
    model = tiny_model()
    tokenizer = bos_tokenizer()
    tokenizer.save_pretrained(model)
    cfg = CompressConfig(model=str(model), out=str(tmp_path / "out"), ratio=0.4,
                         calib=str(small_calib_text), nsamples=4, seqlen=32,
                         bos_windows=asked)  # fmt: skip
    prepared = prepare(cfg, World())
    bos = tokenizer.bos_token_id
    led = asked is not False
    assert bool((prepared.windows[:, 0] == bos).all()) == led
    assert prepared.manifest["calibration"].get("bos") == (bos if led else None)


def test_bos_windows_without_a_bos_token_is_a_named_error(tiny_model, small_calib_text,
                                                          tmp_path):  # fmt: skip
    model = tiny_model()  # its tokenizer has no BOS token
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "streamsvd", "compress", "--model", str(model),
                           "--out", str(out), "--calib", str(small_calib_text), "--nsamples",
                           "4", "--seqlen", "32", "--bos-windows"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--bos-windows" in done.stderr and "no BOS token" in done.stderr
    assert not out.exists()
