"""Healing, as the SVD-LLM code offers it after compression: LoRA fine-tuning of the whole
compressed model on text, with peft, then the adapters merged into the factors.

LoRA goes on each low-rank layer's two halves, `down` (B: rank × in) and `up` (A: out ×
rank), as ordinary linears; merged, B + ΔB and A + ΔA keep their shapes, so the healed
output is a low-rank checkpoint of the same ranks, written shard by shard over the input's
shards (only the factor tensors change), with the same modeling code: it loads as the
compressed output does, in streamsvd and in stock transformers with trust_remote_code.
Merging (rather than keeping a peft adapter beside it) keeps one artefact with no extra
inference cost and no peft at load time; the adapter alone is not kept.

Unlike compression this is not streamed: the whole compressed model is in memory (on the
device), with gradient checkpointing so that activations are one block's plus each
block's input. `heal_memory` states the bytes before it starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calib import calibration_windows, leading_bos, load_text, text_sha256, tokenize
from .checkpoint import (
    CheckpointReader,
    atomic_write_bytes,
    copy_side_files,
    save_shard,
    write_index,
)
from .config import option
from .disk import size_text
from .errors import StreamSVDError
from .lowrank import load_compressed, read_section
from .memory import peak_rss_bytes
from .model import load_tokenizer
from .modeling import SECTION, LowRankLinear
from .refine import CLIP, saved_values_per_token, warmup_cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealConfig:
    """`streamsvd heal`'s settings, each with its command-line option (config.option)."""

    model: str = option(help="streamsvd low-rank output")
    out: str = option(help="output directory (must not exist yet)")
    data: str | None = option(
        None,
        "training text: a local text file, a JSONL file (a 'text' field per line), or a "
        "Hugging Face dataset 'name[:config[:split]]' when online (default: docstrings of the "
        "Python standard library)",
    )
    nsamples: int = option(128, "training windows (default %(default)s)")
    seqlen: int = option(512, "tokens per window (default %(default)s)")
    epochs: int = option(1, "passes over the windows (default %(default)s)")
    lr: float = option(1e-4, "peak AdamW learning rate (default %(default)g)")
    lora_rank: int = option(8, "LoRA rank (default %(default)s)")
    lora_alpha: int = option(16, "LoRA alpha (default %(default)s)")
    batch_size: int = option(4, "windows per step (default %(default)s)")
    seed: int = option(0, "seed for windows and order (default %(default)s)")
    # the command line's default is cuda where there is one (cli._add_device)
    device: str = option("cpu", "where the model trains", choices=["cpu", "cuda"])

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "epochs", "lora_rank", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamSVDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise StreamSVDError(f"learning rate must be positive, got {self.lr}")


def heal_memory(model: torch.nn.Module, cfg: HealConfig) -> dict[str, int]:
    """Bytes healing holds on its device, by part: the model's weights; LoRA's float32
    parameters, gradients and AdamW's two moments; with gradient checkpointing, each
    block's input kept for the backward pass, one block's activations recomputed (as
    refine.py counts them) and the logits with their softmax and gradient."""
    from .model import find_blocks

    text = model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = sum(cfg.lora_rank * (m.down.in_features + 2 * m.rank + m.up.out_features)
               for m in model.modules() if isinstance(m, LowRankLinear))  # fmt: skip
    tokens = cfg.batch_size * cfg.seqlen
    inter = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    ranks = max(sum(m.rank for m in block.modules() if isinstance(m, LowRankLinear))
                for block in find_blocks(model)[1])  # fmt: skip
    per_token = text.num_hidden_layers * text.hidden_size  # each block's input, kept
    per_token += saved_values_per_token(text.hidden_size, inter, ranks)  # one recomputed
    activations = tokens * per_token * 4
    logits = 3 * tokens * text.vocab_size * 4
    return {"weights": weights, "lora": 16 * lora, "activations": activations, "logits": logits}


def heal_windows(cfg: HealConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    """Training windows from a text or JSONL file (each line's "text" field), or a hub
    dataset when online, drawn as calibration windows are."""
    path = Path(cfg.data) if cfg.data else None
    if path is not None and path.suffix == ".jsonl" and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            text = "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StreamSVDError(
                f"{path}: each line of a JSONL file must be an object with a 'text' field ({exc})"
            ) from exc
        source = path.name  # as calib.load_text names a file: no local directories
    else:
        text, source = load_text(cfg.data)
    ids = tokenize(tokenizer, text)  # BOS-led windows where the tokenizer adds BOS, as compress
    windows = calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed, leading_bos(tokenizer))
    return windows, {"source": source, "text_sha256": text_sha256(text)}


def heal(cfg: HealConfig) -> dict:
    """LoRA-heal cfg.model into cfg.out; returns a summary."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise StreamSVDError("healing needs peft: pip install 'streamsvd[heal]'") from exc

    source, out = Path(cfg.model), Path(cfg.out)
    section = read_section(source)
    if section.get("dense"):
        raise StreamSVDError(f"{source} is a dense export; heal takes a low-rank output")
    if section.get("quantization"):
        raise StreamSVDError(
            f"{source} holds quantized factors, which LoRA cannot be merged into; heal the "
            "unquantized output (compress without --bits)"
        )
    if out.exists():
        raise StreamSVDError(f"output {out} already exists; remove it or choose another --out")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = load_compressed(source, cfg.device)
    windows, data = heal_windows(cfg, load_tokenizer(source))  # asks nothing of the user
    targets = [f"{name}.{half}" for name, m in model.named_modules()
               if isinstance(m, LowRankLinear) for half in ("down", "up")]  # fmt: skip
    if not targets:
        raise StreamSVDError(f"{source} has no low-rank layers to heal")
    model = model.float()  # LoRA trains in float32, as refinement does
    memory = heal_memory(model, cfg)
    log.info("healing holds about %s on %s (%s)", size_text(sum(memory.values())), cfg.device,
             ", ".join(f"{k} {size_text(v)}" for k, v in memory.items()))  # fmt: skip
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, bias="none")  # fmt: skip
    model.config.use_cache = False
    model = get_peft_model(model, lora)
    checkpointing = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.x
    (checkpointing or model.gradient_checkpointing_enable)()
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [(s, min(s + cfg.batch_size, cfg.nsamples))
               for s in range(0, cfg.nsamples, cfg.batch_size)]  # fmt: skip
    steps = cfg.epochs * len(batches)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)  # as block refinement's
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(total=steps, desc="Healing", unit="step", disable=None)
    for _ in range(cfg.epochs):
        for j in torch.randperm(len(batches), generator=gen).tolist():
            ids = windows[slice(*batches[j])].to(cfg.device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    bar.close()
    if not all(math.isfinite(v) for v in losses):
        raise StreamSVDError(f"healing diverged (losses {losses[-5:]}); lower --lr")
    merged = model.merge_and_unload()
    factors = {n: p.detach() for n, p in merged.named_parameters()
               if n.endswith((".down.weight", ".up.weight"))}  # fmt: skip
    info = {**asdict(cfg), "data": data, "first_loss": losses[0], "last_loss": losses[-1]}
    write_healed(source, out, factors, info)
    return {"seconds": round(time.perf_counter() - start, 2), "steps": steps,
            "first_loss": losses[0], "last_loss": losses[-1], "planned_bytes": memory,
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "out": str(out)}  # fmt: skip


def write_healed(source: Path, out: Path, factors: dict[str, torch.Tensor], info: dict) -> None:
    """The source's shards with the factor tensors replaced (in the source's dtype), its
    side files and modeling code, and config.json's section recording the healing;
    assembled beside `out` and renamed into place."""
    reader = CheckpointReader(source)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for shard in sorted(set(reader.weight_map.values())):
        names = [n for n, s in reader.weight_map.items() if s == shard]
        tensors = reader.tensors(names)
        for name, value in tensors.items():
            if name in factors:
                tensors[name] = factors[name].to("cpu", value.dtype).contiguous()
        save_shard(tensors, tmp / shard)
        weight_map.update({n: shard for n in tensors})
    missing = set(factors) - set(weight_map)
    if missing:
        raise StreamSVDError(f"healed factors not in {source}'s shards: {sorted(missing)[:5]}")
    write_index(tmp, weight_map)
    copy_side_files(source, tmp)
    config = json.loads((source / "config.json").read_text())
    config[SECTION] = {**config[SECTION], "heal": info}
    atomic_write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
    os.replace(tmp, out)
