"""Perplexity computed block by block from disk, so a model larger than memory can be
scored; and greedy generation from a loaded model (plain or streamsvd)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import StreamSVDError
from .lowrank import skeleton_for
from .model import (
    block_arguments,
    catch_block_inputs,
    empty,
    fill,
    find_blocks,
    run_block,
)


class _Feed(nn.Module):
    """Stands in for the whole block stack: returns hidden states computed beforehand, so
    the model's own code applies the final norm, LM head and loss."""

    hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.hidden


@torch.inference_mode()
def perplexity(path: str | Path, windows: torch.Tensor, batch_size: int = 8,
               device: str = "cpu", progress: bool = True) -> float:  # fmt: skip
    """exp(mean next-token NLL) over (N, T) windows, each scored on its own (P1).

    Loads one block at a time; the hidden states of all windows stay in memory
    (N·T·hidden values), never the whole model. The skeleton is used up afterwards. Runs in
    the dtype compress runs in on `device` (model.compute_dtype: float32 for half
    precision on a CPU).
    """
    model, tensors = skeleton_for(path, device)
    dtype = model.dtype
    prefix, blocks = find_blocks(model)
    tensors.check_unused(prefix)  # scored without them, it would not be this checkpoint
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    rest = [n for n in tensors if not n.startswith(prefix + ".")]
    fill(model, tensors.tensors(rest), "cpu", dtype)
    model.tie_weights()
    hidden = []
    for ids in batches:
        h, _ = catch_block_inputs(model, blocks[0], ids)
        hidden.append(h.to(device))
    # each block's own arguments (sliding and full attention blocks differ)
    arguments = block_arguments(model, blocks, {len(b) for b in batches}, windows.shape[1],
                                device)  # fmt: skip
    for i, block in enumerate(
        tqdm(blocks, desc="Evaluating", unit="block", disable=not progress or None)
    ):
        block_prefix = f"{prefix}.{i}"
        values = tensors.tensors(tensors.under(block_prefix))
        fill(block, {n[len(block_prefix) + 1 :]: t for n, t in values.items()}, device, dtype)
        hidden = [run_block(block, h, arguments[i]) for h in hidden]
        empty(block)
    parent, _, attr = prefix.rpartition(".")
    feed = _Feed()
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList([feed]))
    model.to(device)  # only the embedding, final norm and head remain
    total_nll, total_tokens = 0.0, 0
    # The head runs one window at a time: a batch's logits (batch × T × vocab floats, and
    # the loss's copies of them) would be the largest thing the evaluation holds.
    rows = (row for batch in hidden for row in batch.split(1))  # views: no copy of `hidden`
    for window, h in zip(windows.split(1), rows, strict=True):
        feed.hidden = h
        out = model(input_ids=window.to(device), labels=window.to(device), use_cache=False)
        tokens = window.shape[1] - 1  # the first token of a window has no target
        total_nll += float(out.loss) * tokens
        total_tokens += tokens
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = False) -> str:
    """Greedy continuation of `prompt` (deterministic, so before/after are comparable); with
    `chat`, the reply to `prompt` as a user message, through the model's chat template (an
    instruct model's natural use)."""
    if chat and tokenizer.chat_template:
        message = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(message, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)  # fmt: skip
        ids = ids["input_ids"].to(model.device)
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def text_windows(model: str, data: str | None, seqlen: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `seqlen` tokens of the text file
    `data` (default: Python's help topics, offline), tokenized by `model`'s tokenizer."""
    from .calib import eval_windows, python_help_topics, read_text_file, tokenize
    from .model import load_tokenizer

    if data is not None and not Path(data).is_file():
        raise StreamSVDError(f"evaluation text {data}: no such file")
    text = read_text_file(Path(data)) if data else python_help_topics()
    tokenizer = load_tokenizer(model)
    return eval_windows(tokenize(tokenizer, text, special_tokens=True), seqlen, windows)


def load_any(path: str, device: str) -> nn.Module:
    """A plain checkpoint through transformers, a streamsvd one through load_compressed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .lowrank import load_compressed, read_section
    from .model import compute_dtype

    if read_section(Path(path), required=False) is not None:
        return load_compressed(path, device, as_stored=False)
    # transformers' "Loading weights" bar would land among the results printed next
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        return model.to(device, compute_dtype("auto", model.dtype, device)).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
