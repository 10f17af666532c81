"""The command line, in process through streamsvd.cli.main, and once as a real subprocess."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamsvd import load_compressed
from streamsvd.calib import eval_windows, tokenize
from streamsvd.cli import main
from streamsvd.cpus import usable_cpus
from streamsvd.evaluate import generate, perplexity

SMALL = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", tiny_config(tie=False))


@pytest.fixture(scope="module")
def compressed(model_dir, small_calib_text):
    """(exit code, stdout, stderr, output directory) of one `streamsvd compress` run."""
    out = model_dir.parent / "tiny-svd"
    code, stdout, stderr = run(["compress", "--model", str(model_dir), "--out", str(out),
                                "--ratio", "0.25", "--method", "svdllm-a",
                                "--calib", str(small_calib_text), *SMALL])  # fmt: skip
    return code, stdout, stderr, out


def test_compress_succeeds(compressed, model_dir):
    code, stdout, stderr, out = compressed
    assert code == 0, stderr
    assert "compressed with svdllm-a at ratio 0.25" in stdout
    assert stdout.splitlines()[-1] == f"  output       {out.resolve()}"  # last, where it is seen
    section = json.loads((out / "config.json").read_text())["streamsvd"]
    assert section["complete"] is True and section["method"] == "svdllm-a"
    assert section["ratio"] == 0.25 and len(section["ranks"]) == 14
    assert section["calibration"]["nsamples"] == 4 and section["calibration"]["seqlen"] == 32
    assert not out.with_name(out.name + ".work").exists()
    model = load_compressed(out)
    assert (
        model.get_submodule("model.layers.1.mlp.down_proj").rank
        == section["ranks"]["model.layers.1.mlp.down_proj"]
    )


def test_eval_prints_the_streamed_perplexity(compressed, small_calib_text):
    code, _, stderr, out = compressed
    assert code == 0, stderr
    code, stdout, stderr = run(["eval", "--model", str(out), "--data", str(small_calib_text),
                                "--seqlen", "32", "--windows", "3", "--batch-size", "2",
                                "--device", "cpu"])  # fmt: skip
    assert code == 0, stderr
    assert "over 3 windows of 32 tokens" in stdout
    printed = float(stdout.split("perplexity ")[1].split()[0])
    ids = tokenize(AutoTokenizer.from_pretrained(out), small_calib_text.read_text(), True)
    expected = perplexity(out, eval_windows(ids, 32, 3), progress=False)
    assert printed == pytest.approx(expected, abs=5e-4)  # printed with 3 decimals
    assert 1 < printed < 1e4


def test_generate_continues_the_prompt(compressed):
    code, _, stderr, out = compressed
    assert code == 0, stderr
    prompt = "The module provides"
    code, stdout, stderr = run(["generate", "--model", str(out), "--prompt", prompt,
                                "--max-new-tokens", "5"])  # fmt: skip
    assert code == 0, stderr
    expected = generate(load_compressed(out), AutoTokenizer.from_pretrained(out), prompt, 5)
    assert stdout.rstrip("\n") == prompt + expected


def test_generate_runs_on_the_device_given(compressed, monkeypatch):
    """generate takes --device as eval and compress do, rather than always cuda where
    there is one."""
    from streamsvd import cli, evaluate

    code, _, stderr, out = compressed
    assert code == 0, stderr
    loaded_on = []
    load_any = evaluate.load_any
    monkeypatch.setattr(evaluate, "load_any", lambda path, device: loaded_on.append(device)
                        or load_any(path, device))  # fmt: skip
    monkeypatch.setattr(cli, "_default_device", lambda: "cuda")  # what it took before
    code, _, stderr = run(["generate", "--model", str(out), "--prompt", "The", "--max-new-tokens",
                           "2", "--device", "cpu"])  # fmt: skip
    assert code == 0, stderr
    assert loaded_on == ["cpu"]
    code, _, stderr = run(["generate", "--model", str(out), "--prompt", "x", "--device", "tpu"])
    assert code == 2 and "invalid choice: 'tpu'" in stderr


def test_export_dense_writes_a_plain_checkpoint(compressed, tmp_path):
    code, _, stderr, out = compressed
    assert code == 0, stderr
    dense_dir = tmp_path / "dense"
    code, stdout, stderr = run(["export-dense", "--model", str(out), "--out", str(dense_dir)])
    assert code == 0, stderr
    assert str(dense_dir) in stdout
    dense, info = AutoModelForCausalLM.from_pretrained(
        dense_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    low = load_compressed(out)
    layer = low.get_submodule("model.layers.0.self_attn.q_proj")
    expected = (layer.up.weight.double() @ layer.down.weight.double()).float()
    assert torch.equal(dense.get_submodule("model.layers.0.self_attn.q_proj").weight, expected)

    code, _, stderr = run(["export-dense", "--model", str(out), "--out", str(dense_dir)])
    assert code != 0 and "already exists" in stderr


def test_help_runs_as_a_module():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "streamsvd.cli", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for command in ("compress", "eval", "generate", "export-dense"):
        assert command in result.stdout


def test_module_runs_from_the_folder_holding_a_clone_named_streamsvd(tmp_path):
    """`torchrun ... -m streamsvd` from beside a clone named streamsvd: the clone, holding
    no __init__.py, is a namespace package `streamsvd` in the current folder, which Python
    takes over an editable install's import hook (it comes after the path search), and its
    root cli.py then passed for streamsvd.cli. An editable install of this pyproject puts
    the clone on sys.path instead, where the package is a regular one and wins."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    clone = tmp_path / "streamsvd"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(root / name, clone / name)
    shutil.copytree(root / "streamsvd", clone / "streamsvd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    site = tmp_path / "site"  # the editable install, as `pip install -e` writes it
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
               "--no-build-isolation", "--target", str(site), "-e", str(clone)]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"no editable install here: {done.stderr.strip()[-300:]}")
    hook = tmp_path / "hook"  # site-packages of its own: its .pth files are read at start
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site)!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)}
    check = "import streamsvd.cli, streamsvd; print(streamsvd.__file__, streamsvd.cli.main)"
    for argv, cwd in ([["-c", check], tmp_path], [["-m", "streamsvd", "--help"], tmp_path],
                      [["cli.py", "--help"], clone]):  # fmt: skip
        result = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, (argv, result.stderr[-2000:])
    assert "usage: streamsvd" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU that is not here")
def test_dry_run_plans_a_gpu_run_on_a_machine_without_one(model_dir, small_calib_text, tmp_path):
    """People plan on a login node and run on a GPU node."""
    out = tmp_path / "out"
    argv = [
        "compress",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--device",
        "cuda",
        "--calib",
        str(small_calib_text),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--dry-run",
    ]
    code, stdout, stderr = run(argv)  # fmt: skip
    assert code == 2 and "--device-memory" in stderr and "Traceback" not in stderr
    code, stdout, stderr = run([*argv, "--device-memory", "24"])
    assert code == 0, stderr
    assert "peak device" in stdout and "device memory (--device-memory)" in stdout
    assert "unavailable" in stdout  # no time estimate without the device
    assert not out.exists() and not out.with_name("out.work").exists()


# -- bad input -----------------------------------------------------------------------


def not_decoder_dirs(root) -> dict:
    from transformers import DistilBertConfig, DistilBertModel, ViTConfig, ViTModel

    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    ViTModel(vit).save_pretrained(root / "vit")
    distil = DistilBertConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(distil).save_pretrained(root / "distilbert")
    return {"vit": root / "vit", "distilbert": root / "distilbert"}


def check_refused(argv, out, stderr_has: str, code=None) -> None:
    """A non-zero exit, a clear one-line reason on stderr, no traceback, no output."""
    got, stdout, stderr = run(argv)
    assert got != 0 if code is None else got == code
    assert stderr_has in stderr, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not out.with_name(out.name + ".work").exists()
    assert not out.with_name(out.name + ".partial").exists()


def test_compress_without_model_is_refused(tmp_path, small_calib_text):
    """A forgotten --model would otherwise compress the bundled SmolLM2 under the user's
    output name; the usage says so before it is tried."""
    out = tmp_path / "out"
    check_refused(["compress", "--out", str(out), "--calib", str(small_calib_text), *SMALL],
                  out, "the following arguments are required: --model", code=2)  # fmt: skip
    code, stdout, _ = run(["compress", "--help"])
    usage = stdout.split("\n\n")[0]
    assert code == 0 and "--model MODEL" in usage and "[--model" not in usage


MODEL_COMMANDS = {
    "compress": ["--out", "out", "--calib", "calib.txt", *SMALL],
    "eval": ["--seqlen", "32", "--windows", "1"],
    "generate": ["--prompt", "Hello"],
    "export-dense": ["--out", "dense"],
}
FOLDER = "--model takes the checkpoint folder that holds config.json and the safetensors"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize(
    "given, says",
    [
        ("./Llama-2-13b-hf", "--model ./Llama-2-13b-hf: no such folder ({home}/Llama-2-13b-hf)"),
        ("../up/x", "--model ../up/x: no such folder ({home}/../up/x)"),
        ("~/Llama-2-13b-hf", "--model ~/Llama-2-13b-hf: no such folder ({home}/Llama-2-13b-hf)"),
        ("{home}/x", "--model {home}/x: no such folder ({home}/x)"),
        ("nosuch", "--model nosuch: no such folder ({home}/nosuch)"),
        ("./weights.safetensors", "--model ./weights.safetensors is a file"),
        ("./empty", "--model ./empty holds no config.json"),
    ],
)
def test_model_path_mistakes_read_the_same_in_every_command(command, given, says, tmp_path,
                                                             monkeypatch):  # fmt: skip
    """A value written as a path is a path, never a hub id (`./x` once ended in
    huggingface_hub's HFValidationError traceback), and each mistake is said in the same
    words by every command that takes --model, before any work."""
    home = tmp_path / "home"
    (home / "empty").mkdir(parents=True)
    (home / "weights.safetensors").write_bytes(b"not a folder")
    monkeypatch.chdir(home)
    monkeypatch.setenv("HOME", str(home))  # where ~ goes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub lookup would fail, not hang
    given = given.format(home=home)
    code, stdout, stderr = run([command, "--model", given, *MODEL_COMMANDS[command]])
    assert code == 2, stderr
    says = says.format(home=home).replace(f"{home}/../", f"{tmp_path}/")
    assert stderr == f"streamsvd: error: {says}; {FOLDER}\n"
    assert not (home / "out").exists() and not (home / "dense").exists()


def test_model_paths_with_tilde_and_dots_are_read(compressed, tmp_path, monkeypatch):
    """`~` is expanded, and `./x` read from the working directory."""
    code, _, stderr, out = compressed
    assert code == 0, stderr
    monkeypatch.setenv("HOME", str(out.parent))
    monkeypatch.chdir(out.parent)
    for given in (f"~/{out.name}", f"./{out.name}"):
        code, stdout, stderr = run(["eval", "--model", given, "--seqlen", "16", "--windows",
                                    "1", "--device", "cpu"])  # fmt: skip
        assert code == 0, stderr
        assert "perplexity" in stdout


@pytest.mark.parametrize("kind", ["vit", "distilbert"])
def test_not_a_decoder_language_model(tmp_path, small_calib_text, kind):
    model = not_decoder_dirs(tmp_path)[kind]
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(model), "--out", str(out),
                   "--calib", str(small_calib_text), *SMALL], out,
                  "is not a causal language model")  # fmt: skip


def test_bert_encoder_is_refused_clearly(tmp_path, small_calib_text):
    """transformers builds BertLMHeadModel for any BERT config, so it is the saved class,
    BertForMaskedLM, that tells this checkpoint is an encoder."""
    from conftest import _load_tokenizer
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    bert = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertForMaskedLM(bert).save_pretrained(tmp_path / "bert")
    PreTrainedTokenizerFast(tokenizer_object=_load_tokenizer()).save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(tmp_path / "bert"), "--out", str(out),
                   "--calib", str(small_calib_text), *SMALL], out,
                  "saved as BertForMaskedLM is not a causal language model")  # fmt: skip


@pytest.mark.parametrize("ratio", ["0", "1.5", "1", "-0.2"])
def test_ratio_outside_zero_one(model_dir, small_calib_text, tmp_path, ratio):
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(model_dir), "--out", str(out), "--ratio", ratio,
                   "--calib", str(small_calib_text), *SMALL], out,
                  f"ratio must be in (0, 1), got {float(ratio)}")  # fmt: skip


def test_calibration_text_too_short(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only, far fewer than four windows of 32 tokens.")
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(model_dir), "--out", str(out),
                   "--calib", str(short), *SMALL], out,
                  "calibration text is too short")  # fmt: skip


def test_calibration_file_missing(model_dir, tmp_path):
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(model_dir), "--out", str(out),
                   "--calib", str(tmp_path / "missing.txt"), *SMALL], out,
                  "no such file")  # fmt: skip


def test_seqlen_beyond_max_positions(model_dir, small_calib_text, tmp_path):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(model_dir), "--out", str(out),
            "--calib", str(small_calib_text), "--nsamples", "2", "--seqlen", "300",
            "--device", "cpu"]  # fmt: skip
    check_refused(argv, out, "seqlen 300 exceeds the model's maximum of 256")


def test_existing_output_is_left_alone(model_dir, small_calib_text, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, stderr = run(["compress", "--model", str(model_dir), "--out", str(out),
                           "--calib", str(small_calib_text), *SMALL])  # fmt: skip
    assert code != 0 and "already exists" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert not out.with_name("out.work").exists()


def test_unknown_method_is_an_argparse_error(model_dir, tmp_path):
    out = tmp_path / "out"
    check_refused(["compress", "--model", str(model_dir), "--out", str(out),
                   "--method", "magic", *SMALL], out,
                  "invalid choice: 'magic'", code=2)  # fmt: skip


def test_a_plan_that_says_not_enough_exits_3(model_dir, small_calib_text, tmp_path, monkeypatch):
    """--dry-run is a check a script can act on: NOT ENOUGH is exit code 3 (resources)."""
    from streamsvd import plan as plan_module

    monkeypatch.setattr(plan_module, "host_memory_available", lambda: (1 << 20, "test limit"))
    out = tmp_path / "out"
    code, stdout, stderr = run(["compress", "--model", str(model_dir), "--out", str(out),
                                "--calib", str(small_calib_text), "--nsamples", "4",
                                "--seqlen", "32", "--dry-run"])  # fmt: skip
    assert code == 3, stderr
    assert "host memory (test limit)" in stdout and "NOT ENOUGH" in stdout
    assert not out.exists()


def test_help_lists_the_exit_codes():
    code, stdout, _ = run(["--help"])
    assert code == 0
    for line in ("2    bad input", "3    not enough resources", "4    I/O failure",
                 "130  interrupted", "143  stopped by SIGTERM"):  # fmt: skip
        assert line in stdout


def test_every_option_help_states_its_default():
    """A user reading --help sees what happens when an option is left out."""
    from streamsvd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert command.description, f"{name} --help has no description"
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if action.default not in (None, False):
                assert "default" in (action.help or "") % {"default": action.default}, (
                    name, action.option_strings)  # fmt: skip


def test_every_option_has_help_of_its_own():
    """Each option says what it does in its command: --threads speaks of resuming only where
    a run resumes (compress), status (which reads files) takes none, every command that
    runs a model takes --device."""
    from streamsvd.cli import build_parser

    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices  # fmt: skip
    for name, command in commands.items():
        options = {a.option_strings[-1]: a for a in command._actions if a.option_strings}
        for option, action in options.items():
            assert action.help, f"{name} {option} has no help"
        threads = options.get("--threads")
        assert (threads is None) == (name == "status"), name
        if threads is not None:
            assert ("resum" in threads.help) == (name == "compress"), (name, threads.help)
        runs_a_model = name in ("compress", "eval", "generate", "heal", "demo")
        assert ("--device" in options) == runs_a_model, name


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from streamsvd.cli import build_parser

    return next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices  # fmt: skip


@pytest.mark.parametrize("command", ["compress", "heal"])
def test_every_setting_is_an_option_with_the_settings_default(command):
    """compress's and heal's options are made from their settings' fields: each field
    that is meant for the command line has an option of its name, the field's default
    and type, and the run's other options are the few named here. A field added without
    help, or an option given a default of its own, fails here."""
    import typing

    from streamsvd.config import CompressConfig
    from streamsvd.heal import HealConfig

    settings = {"compress": CompressConfig, "heal": HealConfig}[command]
    not_options = {"compress": {"journal", "prefetch"}, "heal": set()}[command]  # library only
    run_options = {"compress": {"summary_json", "dry_run", "dist_timeout", "processes",
                                "device_memory", "threads"},
                   "heal": {"summary_json", "threads"}}[command]  # fmt: skip
    actions = {a.dest: a for a in _subparsers()[command]._actions if a.option_strings}
    actions.pop("help")
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        if field.name in not_options:
            assert field.name not in actions, field.name
            continue
        action = actions.pop(field.name, None)
        assert action is not None, f"{command}: setting {field.name} has no option"
        if field.default is dataclasses.MISSING:
            assert action.required, field.name
        elif field.name == "device":  # the command line's: cuda where there is one
            assert action.default is None and action.choices == ["cpu", "cuda"]
        else:
            assert action.default == field.default, (field.name, action.default)
        kinds = set(typing.get_args(hints[field.name]) or [hints[field.name]]) - {type(None)}
        if action.type is not None:
            assert kinds == {action.type}, (field.name, action.type)
        else:  # a switch or a string
            assert kinds == ({bool} if action.nargs == 0 else {str}), (field.name, kinds)
    assert set(actions) == run_options, f"{command}: options of no setting {set(actions)}"
    asymmetric = _subparsers()["compress"]._option_string_actions["--asymmetric"]
    assert asymmetric.dest == "quant_symmetric"  # the one option named otherwise than its setting


def test_settings_from_options_as_given(monkeypatch, model_dir, tmp_path):
    """Every option given reaches the settings the command runs with: compress's
    CompressConfig, demo's and synth's function arguments."""
    import streamsvd.demo
    import streamsvd.run

    seen = {}
    monkeypatch.setattr(streamsvd.run, "compress",
                        lambda cfg, world: seen.setdefault("compress", cfg) and {})  # fmt: skip
    monkeypatch.setattr(streamsvd.demo, "demo", lambda **kw: seen.setdefault("demo", kw))
    monkeypatch.setattr("streamsvd.cli.format_summary", lambda s: "")
    code, _, err = run(["compress", "--model", str(model_dir), "--out", str(tmp_path / "o"),
                        "--ratio", "0.3", "--asymmetric", "--bits", "4", "--no-sequential",
                        "--refine-batch", "1", "--batch-size", "2", *SMALL[:4]])  # fmt: skip
    assert code == 0, err
    cfg = seen["compress"]
    assert (cfg.ratio, cfg.quant_symmetric, cfg.bits, cfg.sequential) == (0.3, False, 4, False)
    assert (cfg.refine_batch, cfg.nsamples, cfg.seqlen, cfg.batch_size) == (1, 4, 32, 2)
    assert cfg.model == str(model_dir.resolve()) and cfg.device in ("cpu", "cuda")
    code, _, err = run(["demo", "--ratio", "0.5", "--windows", "3", "--device", "cpu"])
    assert code == 0, err
    assert seen["demo"]["ratio"] == 0.5 and seen["demo"]["windows"] == 3
    assert seen["demo"]["seqlen"] == 256 and seen["demo"]["device"] == "cpu"
    code, out, err = run(["synth", "--shape", "tiny", "--layers", "2", "--shape-only",
                          "--out", str(tmp_path / "synth")])  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'synth'} (")
    assert json.loads((tmp_path / "synth" / "config.json").read_text())["num_hidden_layers"] == 2


def test_cli_functions_fit_on_a_screen():
    """cli.py parses and dispatches: no function of it past 80 lines (docs/development.md)."""
    import ast

    import streamsvd.cli

    tree = ast.parse(Path(streamsvd.cli.__file__).read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 80}  # fmt: skip
    assert not long


def test_own_loader_never_asks_about_remote_code(compressed):
    """streamsvd's loader knows the modeling code is its own: a script reading a compressed
    output with stdin not a terminal must print nothing but its own output (transformers
    would print "Do you wish to run the custom code? [y/N]" on stdout)."""
    code, _, stderr, out = compressed
    assert code == 0, stderr
    script = ("import streamsvd, sys\n"
              "from streamsvd.model import load_tokenizer\n"
              f"model = streamsvd.load_compressed({str(out)!r})\n"
              f"tokenizer = load_tokenizer({str(out)!r})\n"
              "print('loaded')\n")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "loaded\n"
    assert "custom code" not in result.stderr


def test_model_may_be_a_hub_id_from_the_local_cache(model_dir, tmp_path, small_calib_text):
    """`--model org/name` as every tool in the ecosystem takes it: from huggingface_hub's
    cache (laid out here as the hub lays it out) with the hub unreachable; an id in no
    cache is refused with a message saying what to do."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(model_dir, snapshot)
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cli = [sys.executable, "-m", "streamsvd.cli", "-q", "compress", "--calib",
           str(small_calib_text), *SMALL, "--dry-run"]  # fmt: skip
    plan = tmp_path / "plan.json"
    found = subprocess.run([*cli, "--model", "someorg/tiny", "--out", str(tmp_path / "o"),
                            "--summary-json", str(plan)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert json.loads(plan.read_text())["model"] == str(snapshot)  # the cached snapshot
    missing = subprocess.run([*cli, "--model", "someorg/absent", "--out", str(tmp_path / "p")],
                             capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2
    assert "--model someorg/absent: no such folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_importing_streamsvd_does_not_load_torch():
    """OpenMP reads OMP_WAIT_POLICY when torch loads it: a script may still set it after
    `import streamsvd` (on a shared machine, PASSIVE ran plain SVD 3.4× faster)."""
    script = "import sys, streamsvd\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_threads_follow_affinity_and_cgroup_quota(tmp_path):
    """A container limited to 1.5 CPUs gets 1 thread, not one per core of the host."""
    from streamsvd.cpus import cgroup_cpu_quota

    cores = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, no limit
    assert cgroup_cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5 and usable_cpus(tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == min(cores, 4)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no limit
    assert usable_cpus(v1) == cores


def test_threads_option_sets_torch_threads_after_the_command(monkeypatch):
    from streamsvd import cli

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "export-dense",
                        lambda args: seen.append(torch.get_num_threads()))  # fmt: skip
    before = torch.get_num_threads()
    given = ["export-dense", "--model", "/nonexistent", "--out", "/nonexistent"]
    assert run([*given, "--threads", "3"])[0] == 0
    assert seen == [3]  # while the command ran
    assert torch.get_num_threads() == before  # and as it was after
    run(given)
    assert seen[-1] == min(before, usable_cpus())  # the caller's count, capped by the cores
    code, _, stderr = run([*given, "--threads", "0"])
    assert code == 2 and "must be 1 or more" in stderr


def test_log_lines_print_above_a_live_progress_bar(monkeypatch):
    """A log line written while a bar is drawn (the run's "block 3/30: ..." under the
    Compressing bar) starts a line of its own; without tqdm's logging redirect it printed on
    the bar's line, after the bar."""
    import logging

    from tqdm import tqdm

    from streamsvd import cli

    def command(args):
        bar = tqdm(total=2, desc="Compressing", file=sys.stderr, disable=False)  # as on a tty
        bar.update(1)
        logging.getLogger("streamsvd.pipeline").warning("block 1/2 done")
        bar.update(1)
        bar.close()

    monkeypatch.setitem(cli.COMMANDS, "export-dense", command)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        console = logging.StreamHandler(sys.stderr)  # as logging.basicConfig makes it
        logging.root.addHandler(console)
        try:
            code = main(["-q", "export-dense", "--model", "/nonexistent", "--out", "/nowhere"])
        finally:
            logging.root.removeHandler(console)
    assert code == 0
    line = next(line for line in err.getvalue().split("\n") if "block 1/2 done" in line)
    assert line.rsplit("\r", 1)[-1] == "block 1/2 done", repr(line)  # what the terminal shows
    assert "Compressing: 100%" in err.getvalue()  # the bar drawn again, then finished
    assert logging.root.handlers.count(console) == 0 and not any(
        type(h).__name__ == "_TqdmLoggingHandler" for h in logging.root.handlers
    )  # the console handlers as they were


def test_the_command_line_lets_idle_openmp_threads_sleep():
    """OpenMP threads that spin while they wait took the cores of other jobs on a shared
    machine (blocks 10-20x slower): the command line sets OMP_WAIT_POLICY=PASSIVE before
    torch loads libgomp, which reads it then, and keeps a value the user set."""
    watch = (
        "import os, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import streamsvd.cli\n"
        "print(seen, 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for user, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if user is None else {**env, "OMP_WAIT_POLICY": user}
        result = subprocess.run([sys.executable, "-c", watch], capture_output=True, text=True,
                                env=run_env, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[0] == f"['{expected}'] True"


# Makes block 1's first chunk write of the compressed stream slow, as a slow disk would (its
# slot 0 was written first by the run's inputs, then block 0 wrote slot 1): the run waits on
# zarr there when the test signals it, and zarr's I/O thread goes on writing for a while
# after the main thread has stopped.
SLOW_WRITE = """
import signal, sys, time
from pathlib import Path
from zarr.storage import LocalStore
from streamsvd.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
marker, store = Path(sys.argv[1]), Path(sys.argv[2])
real_set = LocalStore.set
writes = []

async def slow_set(self, key, value):
    if key == "comp0/c.0.0.0" and Path(self.root) == store:
        writes.append(key)
        if len(writes) == 2:
            marker.touch()
            time.sleep(3)
    return await real_set(self, key, value)

LocalStore.set = slow_set
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    "sig, code, says, recorded",
    [
        (signal.SIGTERM, 143, "stopped by SIGTERM", "stopped by SIGTERM"),
        (signal.SIGINT, 130, "interrupted", "interrupted (KeyboardInterrupt)"),
    ],
)
def test_a_signal_mid_run_stops_cleanly_and_the_same_command_resumes(
    compressed, model_dir, small_calib_text, tmp_path, sig, code, says, recorded
):
    """SIGTERM (a scheduler's) or Ctrl-C while the run waits on zarr: one line that says
    what happened and how to resume, the exit code a shell gives for that signal, no
    traceback and no warning from zarr's I/O thread; the run directory records why, keeps
    block 0, and the same command resumes to the bytes of a run never stopped."""
    _, _, stderr, reference = compressed
    out, marker = tmp_path / "out", tmp_path / "writing"
    argv = ["compress", "--model", str(model_dir), "--out", str(out), "--ratio", "0.25",
            "--method", "svdllm-a", "--calib", str(small_calib_text), *SMALL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the in-process reference
    env.pop("STREAMSVD_FAULT", None)
    workdir = Path(f"{out}.work")
    script = [sys.executable, "-c", SLOW_WRITE, str(marker), str(workdir / "activations")]
    stopped = subprocess.Popen([*script, "-q", *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()
        time.sleep(0.02)
    stopped.send_signal(sig)
    _, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == code, stderr
    *before, last = stderr.splitlines()
    assert last == f"streamsvd: {says}; finished blocks are kept: rerun the same command to resume"
    # before it, only the warning that SMALL's 4 windows are few for refinement (test_calib.py)
    assert all("WARNING streamsvd.prepare: refinement trains" in line for line in before), before
    assert json.loads((workdir / "last_error.json").read_text())["error"] == recorded
    stages = json.loads((workdir / "journal.json").read_text())["stages"]
    assert "block.0" in stages and "block.1" not in stages

    resumed = subprocess.run([sys.executable, "-m", "streamsvd", *argv], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block 2/2" in resumed.stderr
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
