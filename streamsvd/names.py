"""A checkpoint seen as the model's parameters: the key mapping and weight conversion that
transformers applies when it loads the model, applied here to one block at a time.

Hub checkpoints are stored under names the modules no longer have (GPT-NeoX's `embed_out`,
Mixtral's `block_sparse_moe.experts.0.w1`): transformers renames them and fuses per-expert
2-D weights into 3-D parameters as it loads (`core_model_loading`, driven by the model's
`conversion_mapping`). `ModelTensors` runs those same transforms, from transformers' own
registry, on just the tensors asked for, then splits fused experts per expert (experts.py),
so that every name it gives is a parameter of the streamsvd skeleton.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from .checkpoint import CheckpointReader
from .errors import StreamSVDError
from .experts import unfused_modules


class ModelTensors(Mapping):
    """name -> tensor, named and shaped as the skeleton's parameters. Reads only the
    checkpoint tensors the names asked for come from."""

    def __init__(self, reader: CheckpointReader, model: nn.Module):
        self.reader = reader
        self.path = reader.path
        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}

        # the names a tensor may land on: the skeleton's parameters and, for each
        # UnfusedExperts, the fused parameters of transformers' own module (split here)
        self.experts = unfused_modules(model)
        params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        targets = set(params)
        for path, experts in self.experts.items():
            targets |= {f"{path}.{role}" for role in experts.fused_shapes}
        meta = dict.fromkeys(targets, True)  # what rename_source_key consults for prefixes

        # target -> (its checkpoint names, and for each the converter pattern it matched)
        self._sources: dict[str, list[tuple[str, str | None]]] = {}
        self._converter: dict[str, WeightConverter | None] = {}
        self.unused: list[str] = []  # checkpoint tensors no parameter comes from
        for raw in sorted(reader, key=dot_natural_key):
            if raw in params:  # already a parameter of the skeleton (an expert's own weight
                target, pattern = raw, None  # stored per expert): no fusing and splitting
            else:
                target, pattern = rename_source_key(raw, renamings, converters,
                                                    model.base_model_prefix, meta)  # fmt: skip
            if target not in targets:
                self.unused.append(raw)
                continue
            self._sources.setdefault(target, []).append((raw, pattern))
            self._converter.setdefault(target, by_pattern[pattern] if pattern else None)
        # every parameter the checkpoint provides -> its shape once converted, and the
        # target whose conversion makes it (a converter may make several: qkv -> q, k, v)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._param_target: dict[str, str] = {}
        stored, dtype = reader.shapes(), reader.dtype()
        for target in self._sources:  # on `meta`: shapes without reading a byte
            out = self._convert([target], lambda raw: torch.empty(stored[raw], device="meta",
                                                                  dtype=dtype))  # fmt: skip
            self._shapes |= {n: tuple(t.shape) for n, t in out.items()}
            self._param_target |= dict.fromkeys(out, target)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes())

    def __len__(self) -> int:
        return len(self.shapes())

    def under(self, prefix: str) -> list[str]:
        return [n for n in self.shapes() if n.startswith(prefix + ".")]

    def raw_names(self, names: list[str]) -> list[str]:
        """The checkpoint tensors the named parameters are made from."""
        targets = dict.fromkeys(self._param_target[n] for n in names)
        return [raw for t in targets for raw, _ in self._sources[t]]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters, converted and split, each checked against its shape."""
        targets = list(dict.fromkeys(self._param_target[n] for n in names))
        raw = self.reader.tensors([r for t in targets for r, _ in self._sources[t]])
        out = self._convert(targets, raw.__getitem__)
        expected = self.shapes()
        for name in names:
            if tuple(out[name].shape) != expected[name]:  # a converter misbehaving
                raise StreamSVDError(f"{self.path}: {name} converted to {list(out[name].shape)}")
        return {name: out[name] for name in names}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the checkpoint provides, with the shape it has once converted."""
        return self._shapes

    def _convert(self, targets: list[str], load: Callable[[str], torch.Tensor]) -> dict:
        out: dict[str, torch.Tensor] = {}
        for target in targets:
            converter = self._converter[target]
            sources = self._sources[target]
            if converter is None:
                (raw, _), = sources  # fmt: skip
                values = {target: load(raw)}
            else:
                converter = copy.deepcopy(converter)
                for raw, pattern in sources:
                    converter.add_tensor(target, raw, pattern, load(raw))
                values = converter.convert(target, model=self.model, config=self.model.config)
                values = {k: v[0] if isinstance(v, list) else v for k, v in values.items()}
            for name, value in values.items():
                path, _, role = name.rpartition(".")
                experts = self.experts.get(path)
                if experts is not None and role in experts.fused_shapes:
                    out |= {f"{path}.{k}": v for k, v in experts.split({role: value}).items()}
                else:
                    out[name] = value
        return out

    def check_blocks(self, prefix: str) -> None:
        """Every parameter of the blocks under `prefix` comes from the checkpoint: refuse now
        rather than fail at the block that lacks one."""
        params = [n for n, _ in self.model.named_parameters() if n.startswith(prefix + ".")]
        missing = [n for n in params if n not in self._shapes]
        if missing:
            unmapped = (
                f" (checkpoint tensors it could not place: {self.unused[:3]})"
                if self.unused
                else ""
            )
            raise StreamSVDError(
                f"{self.path}: no checkpoint tensor maps to {len(missing)} block parameter(s), "
                f"e.g. {missing[0]}{unmapped}; the weights do not belong to this config's "
                "architecture, or the checkpoint is incomplete"
            )

    def check_unused(self, prefix: str) -> None:
        """Refuse checkpoint tensors that fit no parameter (dropped, they would leave a model
        that is not the checkpoint's: an unread scale, a format this does not know), naming
        them, unless they are extras transformers itself expects (`expected_extras`)."""
        stray = [n for n in self.unused if n not in expected_extras(self.model, self.unused,
                                                                    prefix)]  # fmt: skip
        if stray:
            raise StreamSVDError(
                f"{self.path}: {len(stray)} checkpoint tensor(s) fit no parameter of the "
                f"{type(self.model).__name__} its config.json describes: "
                f"{', '.join(stray[:5])}{', ...' if len(stray) > 5 else ''}. Compressing "
                "without them could give a wrong model: the checkpoint may be in a format "
                "streamsvd does not read (scales of quantized weights), or not match its "
                "config; convert it to a plain transformers checkpoint (save_pretrained) first"
            )

    # what CheckpointReader offers, for the checkpoint as a whole
    def dtype(self) -> torch.dtype:
        return self.reader.dtype()

    def fingerprint(self) -> dict:
        return self.reader.fingerprint()

    def prefetch(self, names: list[str]) -> None:
        self.reader.prefetch(self.raw_names(names))


def expected_extras(model: nn.Module, names: list[str], prefix: str) -> set[str]:
    """Of checkpoint tensors that fit no parameter, those that are safe to leave out:
    - what transformers' own loading leaves out without a warning
      (`_adjust_missing_and_unexpected_keys`): the model class's
      `_keys_to_ignore_on_load_unexpected` (GPT-2's causal-mask `attn.bias` buffers,
      DeepSeek-V3's layer 61), per-layer `rotary_emb.inv_freq` and `position_ids` of
      older checkpoints, which the model recomputes. Loading the checkpoint with
      transformers gives the same model without them.
    - multi-token-prediction layers stored as blocks past num_hidden_layers, as
      DeepSeek-V3 and GLM-4.5 ship them (`num_nextn_predict_layers` of them): used only to
      draft tokens for speculative decoding, they are no part of the causal LM that
      transformers builds from the config, nor of the output."""
    # the loading report's two fields that the method reads and filters
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(names))
    model._adjust_missing_and_unexpected_keys(info)
    expected = set(names) - info.unexpected_keys
    text = model.config.get_text_config()
    first, extra = text.num_hidden_layers, getattr(text, "num_nextn_predict_layers", 0) or 0
    mtp = tuple(f"{prefix}.{i}." for i in range(first, first + extra))
    return expected | {n for n in names if n.startswith(mtp)}
