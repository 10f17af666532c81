"""Calibration windows: P1's offsets, BOS-led windows for tokenizers that add BOS; too little
calibration refused or warned about, numerical rescues counted; the source recorded by
name."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import _load_tokenizer
from transformers import PreTrainedTokenizerFast

from streamsvd import CompressConfig, compress
from streamsvd.calib import calibration_windows, leading_bos, text_sha256
from streamsvd.cli import format_summary, main
from streamsvd.errors import StreamSVDError
from streamsvd.prepare import REFINE_MIN_WINDOWS, check_calibration_size, prepare
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


# -- calibration that cannot support the result ----------------------------------------------
# The tiny model's down_proj reads 128 inputs (intermediate = 2 × hidden 64), as SmolLM2's
# reads 1,536: 4 windows of 16 tokens are to it what 8 windows of 128 were to SmolLM2, whose
# output came back broken without a word (issue 41).
FEW = dict(nsamples=4, seqlen=16, batch_size=4, ratio=0.4, refine_epochs=0)


def _compress_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamsvd", *argv], capture_output=True,
                          text=True)  # fmt: skip


def test_fewer_tokens_than_a_layers_inputs_is_refused_before_any_work(tiny_model,
                                                                       small_calib_text,
                                                                       tmp_path,
                                                                       capsys):  # fmt: skip
    """Refused with exit 2, naming the layer, its width and what would do, and nothing
    written; the plan (--dry-run, in process) says the same."""
    model, out = tiny_model(), tmp_path / "out"
    argv = ["compress", "--model", str(model), "--out", str(out), "--calib",
            str(small_calib_text), "--nsamples", "4", "--seqlen", "16"]  # fmt: skip
    done = _compress_cli(*argv)
    assert main([*argv, "--dry-run"]) == done.returncode == 2, done.stderr
    for stderr in (done.stderr, capsys.readouterr().err):
        assert "64 tokens, fewer than the 128 inputs of mlp.down_proj" in stderr
        assert "--nsamples 8 at --seqlen 16" in stderr
        assert "--allow-few-tokens" in stderr and "Traceback" not in stderr
    assert not out.exists() and not out.with_name("out.work").exists()


def test_too_few_windows_for_refinement_is_a_warning_even_with_quiet(tiny_model, tmp_path,
                                                                     caplog):  # fmt: skip
    """Refinement on fewer windows than it was measured to learn from is warned about
    before any work (here the calibration text then proves too short), even with -q (so
    at the default verbosity too, which shows INFO); not without refinement."""
    model, short = tiny_model(), tmp_path / "short.txt"
    short.write_text("too short to calibrate on")
    argv = ["compress", "--model", str(model), "--out", str(tmp_path / "out"), "--calib",
            str(short), "--nsamples", "8", "--seqlen", "16"]  # fmt: skip
    done = _compress_cli("-q", *argv)
    assert done.returncode == 2 and "calibration text is too short" in done.stderr
    warning = done.stderr[: done.stderr.index("streamsvd: error")]
    assert "WARNING" in warning and "8 calibration windows" in warning
    assert f"--nsamples {REFINE_MIN_WINDOWS} or more" in warning
    cfg = CompressConfig(model=str(model), out=str(tmp_path / "out"), nsamples=8, seqlen=16,
                         refine_epochs=0)  # fmt: skip
    check_calibration_size(cfg, _blocks(model))
    assert not caplog.records


def _blocks(model):
    """The model's decoder blocks, on `meta`."""
    from streamsvd.model import build_skeleton, find_blocks, load_config

    return find_blocks(build_skeleton(load_config(str(model)), torch.float32))[1]


def _damping_warnings(records) -> list[str]:
    return [r.getMessage() for r in records
            if r.levelno >= logging.WARNING and "Cholesky" in r.getMessage()]  # fmt: skip


def test_rank_deficient_statistics_are_warned_about_and_counted(tiny_model, small_calib_text,
                                                                tmp_path, caplog,
                                                                monkeypatch):  # fmt: skip
    """Let through (--allow-few-tokens), 64 tokens against down_proj's 128 inputs: each
    block warns naming the layer and the damping, the summary counts it, and a resumed run
    counts what the blocks before the stop needed too. Well supported statistics (256
    tokens) warn of nothing."""
    model = tiny_model()
    settings = dict(model=str(model), calib=str(small_calib_text), **FEW)
    caplog.set_level(logging.WARNING)
    summary = compress(CompressConfig(out=str(tmp_path / "few"), allow_few_tokens=True,
                                      **settings))  # fmt: skip
    warned = _damping_warnings(caplog.records)
    assert len(warned) == 2  # one a block
    for i, message in enumerate(warned):
        assert f"block {i + 1}/2" in message
        assert f"model.layers.{i}.mlp.down_proj G'" in message
        assert "× its mean diagonal, from 64 tokens for 128 inputs" in message
    rescues = summary["numerical_rescues"]
    grams = [e["gram"] for e in rescues["escalated"]]
    assert grams == ["model.layers.0.mlp.down_proj G'", "model.layers.1.mlp.down_proj G'"]
    assert sum(rescues["damped"].values()) >= 2
    assert "past the routine level" in format_summary(summary)

    monkeypatch.setenv("STREAMSVD_FAULT", "between:1:eio")  # block 0 journaled, then a stop
    cfg = CompressConfig(out=str(tmp_path / "resumed"), allow_few_tokens=True, **settings)
    with pytest.raises(StreamSVDError):
        compress(cfg)
    monkeypatch.delenv("STREAMSVD_FAULT")
    assert compress(cfg)["numerical_rescues"] == rescues

    caplog.clear()
    enough = dict(settings, nsamples=8, seqlen=32)
    summary = compress(CompressConfig(out=str(tmp_path / "enough"), **enough))
    assert _damping_warnings(caplog.records) == []
    assert summary["numerical_rescues"]["escalated"] == []


def test_the_output_names_its_calibration_file_without_its_directories(tiny_model,
                                                                        small_calib_text,
                                                                        tmp_path):  # fmt: skip
    """config.json records the calibration file by name and SHA-256: a published model does
    not tell the world its author's directories."""
    model = tiny_model()
    out = tmp_path / "out"
    compress(CompressConfig(model=str(model), out=str(out), calib=str(small_calib_text),
                            nsamples=8, seqlen=32, batch_size=4, refine_epochs=0))  # fmt: skip
    text = (out / "config.json").read_text()
    calibration = json.loads(text)["streamsvd"]["calibration"]
    assert calibration["source"] == small_calib_text.name
    assert calibration["text_sha256"] == text_sha256(small_calib_text.read_text())
    for part in small_calib_text.parent.parts[1:]:  # every directory, the root aside
        assert part not in text
