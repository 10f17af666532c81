"""Text in, token windows out, deterministically. Knows nothing about models."""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from pathlib import Path

import torch

from .errors import StreamSVDError

DEFAULT_SOURCE = "python-docs"  # what a run with no --calib uses
_DEFAULT_CHARS = 2_000_000


def stdlib_docstrings(max_chars: int = _DEFAULT_CHARS) -> str:
    """English prose that ships with every Python: the docstrings of the standard library,
    read in sorted file order. The default calibration text: offline and on any machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    pieces.append(doc)
                    total += len(doc) + 2
        if total >= max_chars:
            break
    return "\n\n".join(pieces)


def python_help_topics() -> str:
    """Python's own help pages (pydoc_data): offline English prose, disjoint from the
    docstrings used for calibration, so the default evaluation text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str | None) -> tuple[str, str]:
    """(text, description) from a local file, a Hugging Face dataset name
    ("name[:config[:split]]", needs the `datasets` package and the hub), or the default. A
    file is described by its name alone: the description goes into the output's config.json,
    which may be published, and the author's directories are nobody's business (the text's
    SHA-256, recorded beside it, says which text it was)."""
    if source is None or source == DEFAULT_SOURCE:
        return stdlib_docstrings(), f"{DEFAULT_SOURCE} (docstrings of the Python standard library)"
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path), path.name
    if path.exists() or not _looks_like_dataset(source):
        raise StreamSVDError(f"calibration text {source}: no such file")
    return _hub_dataset_text(source), f"hub dataset {source}"


PRINTABLE_SHARE = 0.95  # of a text's characters, at least: letters, digits, punctuation, space


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents; a binary or otherwise non-text file is refused with
    what is wrong (a binary tokenises to nonsense, and compression runs on it all the same)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StreamSVDError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "give a plain text file, or convert it with iconv"
        ) from None
    sample = text[:1_000_000]
    printable = sum(c.isprintable() or c.isspace() for c in sample)
    if sample and printable < PRINTABLE_SHARE * len(sample):
        raise StreamSVDError(
            f"{path} does not look like text: only {printable / len(sample):.0%} of its "
            "characters are printable; give a plain text file"
        )
    return text


def _looks_like_dataset(source: str) -> bool:
    """Hub names are 'name' or 'owner/name' (plus ':config:split'), never a path or file name."""
    name = source.split(":")[0]
    return (
        name.count("/") <= 1
        and not name.startswith((".", "/", "~"))
        and not name.endswith((".txt", ".md", ".json", ".jsonl", ".csv"))
    )


def _hub_dataset_text(source: str) -> str:
    name, _, rest = source.partition(":")
    config, _, split = rest.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise StreamSVDError(
            f"{source} is neither a local file nor loadable as a dataset: install `datasets` "
            "to use Hugging Face dataset names, or pass a path to a text file"
        ) from exc
    try:
        data = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # the hub raises many kinds; all mean "not available"
        raise StreamSVDError(f"could not load dataset {source!r} (offline?): {exc}") from exc
    column = "text" if "text" in data.column_names else data.column_names[0]
    return "\n\n".join(data[column])


def as_chat(text: str, tokenizer) -> str:
    """The text recast as the conversations an instruct model was tuned on: each paragraph
    becomes an assistant's answer to a request for it, through the tokenizer's own chat
    template. Calibrating on plain prose tunes the factors to prose, and the compressed
    model's replies in the chat format suffer for it."""
    turns = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        first_line = paragraph.splitlines()[0]
        conversation = [
            {"role": "user", "content": f"Explain this: {first_line}"},
            {"role": "assistant", "content": paragraph},
        ]
        turns.append(tokenizer.apply_chat_template(conversation, tokenize=False))
    return "".join(turns)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize(tokenizer, text: str, special_tokens: bool = False) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids (tokenised once, as P1 asks)."""
    ids = tokenizer(text, add_special_tokens=special_tokens, return_attention_mask=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text it encodes (Llama, Gemma, Mistral),
    or None where it adds none (SmolLM2, Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:  # fmt: skip
    """(nsamples, seqlen) windows at offsets uniform from random.Random(seed) (P1).

    With `bos`, each window is that token and the seqlen − 1 tokens of text at the same
    offset: a model whose tokenizer adds BOS sees it first in every real input, and treats
    the first position very differently (benchmarks/results/bos_windows.md)."""
    if len(ids) < nsamples * seqlen:
        raise StreamSVDError(
            f"calibration text is too short: {len(ids)} tokens, need at least nsamples × seqlen "
            f"= {nsamples} × {seqlen} = {nsamples * seqlen}; give a longer --calib text or "
            "lower --nsamples/--seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    if bos is None:
        return torch.stack([ids[s : s + seqlen] for s in starts])
    lead = torch.tensor([bos], dtype=ids.dtype)
    return torch.stack([torch.cat([lead, ids[s : s + seqlen - 1]]) for s in starts])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The first non-overlapping windows of seqlen tokens (P1: 128 × 512)."""
    count = len(ids) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise StreamSVDError(
            f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}"
        )
    return ids[: count * seqlen].view(count, seqlen)
