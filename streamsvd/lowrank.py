"""A compressed checkpoint: its structure, loading it, making it self-describing (its own
modeling code for stock transformers), and exporting it dense."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from . import modeling
from .checkpoint import (
    CheckpointReader,
    atomic_write_bytes,
    copy_side_files,
    save_shard,
    write_index,
)
from .errors import StreamSVDError
from .experts import fuse_dense_experts
from .journal import JOURNAL, MANIFEST
from .model import build_skeleton, compute_dtype, load_config
from .modeling import SECTION, compressed_structure, remote_code_footer
from .names import ModelTensors


def read_section(path: Path, required: bool = True) -> dict | None:
    """The streamsvd section of a checkpoint's config.json, checked complete; None for a
    plain checkpoint when not required."""
    config_path = path / "config.json"
    if not config_path.exists():
        _refuse_unfinished(path)
        raise StreamSVDError(f"{path} is not a model directory (no config.json)")
    section = json.loads(config_path.read_text()).get(SECTION)
    if section is None:
        if not required:
            return None
        raise StreamSVDError(
            f"{path} was not written by streamsvd compress (no '{SECTION}' section in config.json)"
        )
    if not section.get("complete"):
        raise StreamSVDError(
            f"{path} is an incomplete streamsvd output: its run did not finish; "
            "rerun the same compress command to resume it"
        )
    return section


def _refuse_unfinished(path: Path) -> None:
    """A clear error for the places an unfinished compress run leaves things: its run
    directory, or an output path that does not exist yet while its run does."""
    if (path / MANIFEST).exists() or (path / JOURNAL).exists():
        raise StreamSVDError(
            f"{path} is the run directory of an unfinished streamsvd compress run, not a "
            f"model; `streamsvd status --workdir {path}` shows where it stands, and rerunning "
            "the same compress command finishes it"
        )
    for leftover in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".work")):
        if not path.exists() and leftover.exists():
            raise StreamSVDError(
                f"{path} is an incomplete streamsvd output: its compress run has not "
                f"finished ({leftover} exists); rerun the same compress command to finish it"
            )


def skeleton_for(
    path: str | os.PathLike, device: str | None = None
) -> tuple[nn.Module, ModelTensors]:
    """Meta-device skeleton of any checkpoint directory, plain or streamsvd-compressed (then
    with LowRankLinear layers of the recorded ranks in place), and its tensors, named as
    the skeleton's parameters. In the checkpoint's dtype, or with `device` in the dtype
    it runs in there (model.compute_dtype: float32 for half precision on a CPU)."""
    path = Path(path)
    section = read_section(path, required=False) or {}
    reader = CheckpointReader(path)
    dtype = reader.dtype() if device is None else compute_dtype("auto", reader.dtype(), device)
    model = build_skeleton(load_config(path), dtype)
    compressed_structure(model, {} if section.get("dense") else section.get("ranks", {}))
    return model, ModelTensors(reader, model)


def load_compressed(path: str | os.PathLike, device: str = "cpu",
                    as_stored: bool = True) -> nn.Module:  # fmt: skip
    """The original transformers architecture with LowRankLinear layers in place, in memory.

    Works for compressed and dense-exported streamsvd outputs alike. In the dtype the
    output was written in; as_stored=False: in the dtype it runs in on `device`
    (model.compute_dtype: float32 for half precision on a CPU).
    """
    read_section(Path(path))
    return load_model(path, device, as_stored)


def load_model(path: str | os.PathLike, device: str = "cpu", as_stored: bool = True) -> nn.Module:
    """Any checkpoint directory, plain or streamsvd output, in streamsvd's skeleton (experts
    as per-expert linears, LowRankLinear where the output has factors), in memory."""
    model, tensors = skeleton_for(path, None if as_stored else device)
    dtype = model.dtype  # the skeleton's, before the stored tensors are assigned
    if tensors.unused:
        raise StreamSVDError(f"{path}: tensors that fit no layer: {tensors.unused[:5]}")
    model.load_state_dict(tensors.tensors(list(tensors)), strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise StreamSVDError(f"{path}: checkpoint lacks tensors {missing[:5]}")
    if not as_stored:  # the stored tensors were assigned as they are: cast them
        model.to(dtype)
    return model.to(device).eval()


MODELING_FILE = "modeling_streamsvd.py"


def self_describing(config: dict, out: Path, config_class: str, model_class: str,
                    base_class: str) -> dict:  # fmt: skip
    """Make a low-rank output load with stock transformers: write its modeling code (this
    package's modeling.py, self-contained, plus its two classes) beside it and point
    config.json's auto_map at them. Its own model_type makes loading without
    trust_remote_code fail with transformers' own message, instead of building the original
    architecture with random weights where the factors are. Returns the new config."""
    base = config["model_type"]
    code = Path(modeling.__file__).read_text() + remote_code_footer(config_class, model_class,
                                                                    base, base_class)  # fmt: skip
    atomic_write_bytes(out / MODELING_FILE, code.encode())
    config = {**config, "model_type": f"streamsvd_{base}"}
    # in the order vLLM's Transformers backend loads them: the config class first; then
    # AutoModel, the base model, which the backend builds (docs/models.md#vllm)
    config["auto_map"] = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.StreamSVDConfig",
        "AutoModel": f"{MODELING_FILE[:-3]}.StreamSVDModel",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.StreamSVDForCausalLM",
    }
    config[SECTION] = {**config[SECTION], "base_model_type": base}
    return config


def export_dense(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write W = A·B for every low-rank pair: a standard checkpoint that plain
    AutoModelForCausalLM.from_pretrained loads. Works shard by shard: a Conv1D's weight is
    stored transposed again, and experts are fused into transformers' 3-D parameters."""
    path, out = Path(path), Path(out)
    section = read_section(path)
    reader = CheckpointReader(path)
    original = build_skeleton(load_config(path), reader.dtype())  # the layers' own types
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = section.get("base_model_type", config["model_type"])  # stock again
    config.pop("auto_map", None)
    config.pop("quantization_config", None)  # factors read dequantized, written dense
    config[SECTION] = {**section, "dense": True, "complete": False}  # until the end
    atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
    # factor tensor name -> dense tensor name, or None for B (folded into A's entry)
    renames = {}
    for layer in section.get("ranks", {}):
        renames |= {
            f"{layer}.up.weight": f"{layer}.weight",
            f"{layer}.up.bias": f"{layer}.bias",
            f"{layer}.down.weight": None,
        }
    weight_map = {}
    for shard in sorted(set(reader.weight_map.values())):
        tensors = reader.tensors([n for n, s in reader.weight_map.items() if s == shard])
        dense = {}
        for name, value in tensors.items():
            new_name = renames.get(name, name)
            if name.endswith(".up.weight") and new_name != name:
                B = tensors[name[: -len("up.weight")] + "down.weight"]
                value = (value.double() @ B.double()).to(value.dtype)
                if isinstance(original.get_submodule(new_name[: -len(".weight")]), Conv1D):
                    value = value.t().contiguous()
            if new_name is not None:
                dense[new_name] = value
        dense = fuse_dense_experts(original, dense)
        save_shard(dense, tmp / shard)
        weight_map.update({n: shard for n in dense})
    write_index(tmp, weight_map)
    copy_side_files(path, tmp)
    (tmp / MODELING_FILE).unlink(missing_ok=True)  # a dense checkpoint needs no code of its own
    config[SECTION]["complete"] = True
    atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
