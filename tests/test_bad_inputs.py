"""A fuzz of bad inputs through the CLI: each is found before any work and said plainly.

For every row: a non-zero exit code (2 bad input, 3 not enough resources, as `--help`
lists), one line on stderr that names the problem, no traceback, and no output directory
that looks finished (no OUT, no OUT.partial).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from safetensors.torch import load_file, save_file

from streamsvd import preflight
from streamsvd.cli import main

SMALL = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("good") / "model", tiny_config())


@pytest.fixture
def model(good, tmp_path) -> Path:
    """A fresh copy of the good checkpoint, to damage."""
    return Path(shutil.copytree(good, tmp_path / "model"))


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["-q", *argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def refused(argv: list[str], out: Path, says: str, code: int = 2) -> str:
    got, _, stderr = run(argv)
    lines = stderr.strip().splitlines()
    assert got == code, stderr
    assert len(lines) == 1 and lines[0].startswith("streamsvd: error: "), stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


def compress(model: Path, out: Path, calib: Path, *more: str) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), "--calib", str(calib),
            *SMALL, *more]  # fmt: skip


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# -- the checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1000, 0.6])  # bytes, or a share of the file
@pytest.mark.parametrize("dry_run", [False, True])
def test_truncated_shard(model, tmp_path, small_calib_text, keep, dry_run):
    shard = shards(model)[1]
    size = shard.stat().st_size
    os.truncate(shard, keep if isinstance(keep, int) else int(size * keep))
    argv = compress(model, tmp_path / "out", small_calib_text) + ["--dry-run"] * dry_run
    line = refused(argv, tmp_path / "out", str(shard))
    assert "truncated" in line


def test_index_names_a_missing_shard(model, tmp_path, small_calib_text):
    missing = shards(model)[2]
    missing.unlink()
    refused(compress(model, tmp_path / "out", small_calib_text), tmp_path / "out",
            f"shard {missing.name} named in the index is missing")  # fmt: skip


def test_tensor_of_the_wrong_shape(model, tmp_path, small_calib_text):
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-8].contiguous()  # 8 input channels short
    save_file(tensors, shard, metadata={"format": "pt"})
    line = refused(compress(model, tmp_path / "out", small_calib_text), tmp_path / "out",
                   "do not have the shape config.json gives them")  # fmt: skip
    assert name in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(model, tmp_path, small_calib_text, bad):
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors = load_file(model / index[name])
    tensors[name][3, 5] = bad
    save_file(tensors, model / index[name], metadata={"format": "pt"})
    out = tmp_path / "out"
    line = refused(compress(model, out, small_calib_text), out, f"{name} in {model}")
    assert "1 NaN or inf value" in line


def test_unknown_model_type(model, tmp_path, small_calib_text):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model / "config.json").write_text(json.dumps(config))
    refused(compress(model, tmp_path / "out", small_calib_text), tmp_path / "out",
            "no usable config.json")  # fmt: skip


# -- the calibration text ------------------------------------------------------------------


def test_binary_calibration_file(model, tmp_path):
    out = tmp_path / "out"
    line = refused(compress(model, out, Path(sys.executable)), out, sys.executable)
    assert "not UTF-8 text" in line or "does not look like text" in line


def test_non_utf8_text(model, tmp_path, small_calib_text):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(small_calib_text.read_text().encode() + "café".encode("latin-1"))
    out = tmp_path / "out"
    line = refused(compress(model, out, latin1), out, "is not UTF-8 text (byte 0xe9")
    assert str(latin1) in line


def test_control_characters_are_not_text(model, tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_text("".join(chr(c % 32) for c in range(20_000)))  # valid UTF-8, no text
    out = tmp_path / "out"
    refused(compress(model, out, noise), out, "does not look like text")


def test_seqlen_longer_than_the_calibration_text(model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short calibration text, far from enough for one window. " * 3)
    out = tmp_path / "out"
    refused(compress(model, out, short), out, "calibration text is too short")


# -- where the output goes -------------------------------------------------------------


def test_out_on_a_pseudo_filesystem(model, small_calib_text, tmp_path):
    if preflight.filesystem_type(Path("/proc")) != "proc":
        pytest.skip("no /proc here")
    refused(compress(model, Path("/proc/streamsvd-out"), small_calib_text),
            Path("/proc/streamsvd-out"), "is on a proc pseudo-filesystem")  # fmt: skip


@pytest.mark.parametrize("which", ["out", "workdir"])
def test_read_only_location_is_found_before_any_work(model, tmp_path, small_calib_text,
                                                     monkeypatch, which):  # fmt: skip
    """A read-only filesystem, as the probe write meets it (root can write to any folder
    here, whatever its mode, so the failure is injected where the probe writes)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = preflight.tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):
        if Path(dir) == read_only:
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", probe)
    out = read_only / "out" if which == "out" else tmp_path / "out"
    argv = compress(model, out, small_calib_text)
    if which == "workdir":
        argv += ["--workdir", str(read_only / "work")]
    line = refused(argv, out, "Read-only file system")
    assert "--out" in line if which == "out" else "--workdir" in line
    assert not (read_only / "out.work").exists() and not (tmp_path / "out.work").exists()


def test_out_inside_the_model(model, small_calib_text):
    out = model / "compressed"
    refused(compress(model, out, small_calib_text), out, "is inside the checkpoint")


def test_symlinked_out(model, tmp_path, small_calib_text):
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "elsewhere")  # dangling: the output would replace the link
    got, _, stderr = run(compress(model, out, small_calib_text))
    assert got == 2 and "is a symbolic link" in stderr and "Traceback" not in stderr
    assert out.is_symlink() and not (tmp_path / "elsewhere").exists()


# -- planning ----------------------------------------------------------------------------


def test_dry_run_from_a_folder_holding_another_streamsvd(good, tmp_path, small_calib_text):
    """The plan's probe subprocess must import this streamsvd, not one in the caller's cwd."""
    (tmp_path / "streamsvd").mkdir()
    (tmp_path / "streamsvd" / "__init__.py").write_text("raise ImportError('the wrong one')\n")
    script = Path(sys.executable).with_name("streamsvd")  # the console script, as users run it
    if not script.exists():
        pytest.skip("streamsvd is not installed as a console script here")
    argv = [str(script), "-q", *compress(good, tmp_path / "out", small_calib_text), "--dry-run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "peak host" in done.stdout


# -- float16 that overflows ------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    """A float16 checkpoint whose residual stream leaves float16's range (65504) in its
    third block, as some real models' activations do: the original model's own stream
    overflows, whatever the method does to the compressed one (its MLP's output grows as
    the cube of the scale: ×12 peaks near 2e3 on random tokens, so ×60 reaches about 2.6e5)."""
    path = tmp_path_factory.mktemp("fp16") / "model"
    write_checkpoint(path, tiny_config(layers=4), dtype=torch.float16)
    for shard in shards(path):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if ".layers.2.mlp" in name:
                tensors[name] = (t.float() * 60).half()
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


def test_float16_overflow_compresses_in_float32(overflowing, tmp_path, small_calib_text):
    out = tmp_path / "out"
    line = refused(compress(overflowing, out, small_calib_text, "--compute-dtype", "checkpoint"),
                   out, "--compute-dtype float32")  # fmt: skip
    assert "overflowed" in line
    code, stdout, stderr = run(compress(overflowing, tmp_path / "ok", small_calib_text))
    assert code == 0, stderr
    assert "blocks ran in float32; the output is float16" in stdout
    factors = [t for p in (tmp_path / "ok").glob("*.safetensors") for t in load_file(p).values()]
    assert {t.dtype for t in factors} == {torch.float16}
    assert all(torch.isfinite(t).all() for t in factors)


def test_out_on_a_real_read_only_mount(model, tmp_path, small_calib_text):
    """The same on a real read-only filesystem, where this machine lets us mount one."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        out = ro / "out"
        line = refused(compress(model, out, small_calib_text), out, "Read-only file system")
        assert "--out" in line
        line = refused(
            compress(model, tmp_path / "out2", small_calib_text, "--workdir", str(ro / "work")),
            tmp_path / "out2",
            "Read-only file system",
        )
        assert "--workdir" in line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
