"""Checkpoint files: read one block's tensors from safetensors shards, write shards atomically.

Reading follows accelerate's OffloadedWeightsLoader: a mapping over the index that opens
a shard per request, so only the tensors asked for are ever in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import StreamSVDError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class CheckpointReader(Mapping):
    """Lazy name -> tensor view of a Hugging Face safetensors checkpoint directory.

    A quantized linear (FP8 with its scales, a compressed-tensors module: formats.py) is
    seen as its dequantized `weight`, in the checkpoint's float dtype, computed when read;
    a format it cannot read is refused here, before any work."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is a file" if self.path.exists() else "does not exist"
            raise StreamSVDError(f"{self.path} {what}: a checkpoint is {CHECKPOINT_FOLDER}")
        index = self.path / INDEX_NAME
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).exists():
            header = check_shard(self.path / SINGLE_NAME)
            self.weight_map = {key: SINGLE_NAME for key in header}
        else:
            raise StreamSVDError(
                f"{self.path} holds no {INDEX_NAME} or {SINGLE_NAME}: streamsvd reads "
                "Hugging Face safetensors checkpoints (save yours with save_pretrained)"
            )
        self.headers: dict[str, dict] = {}  # stored name -> dtype, shape, data offsets
        for shard in sorted(set(self.weight_map.values())):
            if not (self.path / shard).exists():
                raise StreamSVDError(
                    f"shard {shard} named in the index is missing from {self.path}"
                )
            header = check_shard(self.path / shard)
            missing = [n for n, s in self.weight_map.items() if s == shard and n not in header]
            if missing:
                raise StreamSVDError(
                    f"shard {self.path / shard} lacks {len(missing)} tensor(s) its index puts "
                    f"there, e.g. {missing[0]}: the checkpoint is incomplete or mixed up"
                )
            self.headers |= {n: header[n] for n, s in self.weight_map.items() if s == shard}
        self.stored = dict(self.weight_map)  # the names in the files
        self._dtype: torch.dtype | None = None
        self._quantized_views()

    def _quantized_views(self) -> None:
        """Put each quantized weight in the name map in place of its stored parts, and take
        out the activation scales nothing reads (formats.RUNTIME_SCALES says why)."""
        from .formats import source_format

        source = source_format(self.path, self.headers, self._read_stored)
        self.quant_method = source.method
        self.quantized = source.weights  # weight name -> formats.QuantizedWeight
        self.runtime_scales = source.runtime
        for name, weight in self.quantized.items():
            for part in weight.parts.values():
                self.weight_map.pop(part, None)
            self.weight_map[name] = self.stored[next(iter(weight.parts.values()))]
        for name in self.runtime_scales:
            self.weight_map.pop(name, None)

    def _raw_names(self, names: list[str]) -> list[str]:
        """The stored tensors the names are read from."""
        out = []
        for name in names:
            weight = self.quantized.get(name)
            out += list(weight.parts.values()) if weight else [name]
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard once. Quantized weights are
        dequantized one at a time, each one's stored parts dropped as it is done: at the
        peak, the dequantized tensors and one weight's codes are held."""
        out = self._read_stored(self._raw_names(names))
        dtype = self.dtype() if self.quantized else None
        for name in names:
            weight = self.quantized.get(name)
            if weight is not None:
                parts = {role: out.pop(stored) for role, stored in weight.parts.items()}
                out[name] = weight.dequantize(parts, dtype)
        return {name: out[name] for name in names}

    def _read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Stored tensors as they are in the files, by their stored names."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.stored[name], []).append(name)
        out = {}
        for shard, shard_names in sorted(by_shard.items()):
            with safe_open(self.path / shard, "pt") as f:
                for name in shard_names:
                    out[name] = f.get_tensor(name)
        return out

    def prefetch(self, names: list[str]) -> None:
        """Ask the kernel to read the named tensors' bytes into the page cache ahead of use
        (posix_fadvise WILLNEED), holding nothing in this process: run in a thread while
        one block computes, the next block's read overlaps it. A no-op without fadvise."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_shard: dict[str, list[str]] = {}
        for name in self._raw_names(names):
            by_shard.setdefault(self.stored[name], []).append(name)
        for shard, shard_names in sorted(by_shard.items()):
            ranges = data_ranges(self.path / shard)
            fd = os.open(self.path / shard, os.O_RDONLY)
            try:
                for name in shard_names:
                    start, stop = ranges[name]
                    os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def under(self, prefix: str) -> list[str]:
        """Names inside module `prefix` (matching `prefix.` so layers.1 never takes layers.10)."""
        return [name for name in self.weight_map if name.startswith(prefix + ".")]

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, from the headers (a quantized weight's: dequantized)."""
        return {
            name: self.quantized[name].shape
            if name in self.quantized
            else self.headers[name]["shape"]
            for name in self.weight_map
        }

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point weights, which quantized weights
        are dequantized into: never float8, nor that of scales."""
        if self._dtype is None:
            self._dtype = self._float_dtype()
        return self._dtype

    def _float_dtype(self) -> torch.dtype:
        for shard in sorted(set(self.weight_map.values())):
            with safe_open(self.path / shard, "pt") as f:
                for name in f.keys():
                    if name not in self.weight_map or name in self.quantized:
                        continue  # a quantized weight's codes or scales
                    dtype = f.get_slice(name).get_dtype()
                    if dtype in _FLOAT_DTYPES:
                        return _FLOAT_DTYPES[dtype]
        raise StreamSVDError(f"{self.path} holds no floating-point weights")

    def fingerprint(self) -> dict:
        """Names, sizes, header hashes and a hash of the first and last MiB of data of each
        shard: changes whenever the weights do in practice (a fine-tune keeps every header),
        without reading gigabytes of data."""
        shards = {}
        for shard in sorted(set(self.stored.values())):  # scales' shards too
            path = self.path / shard
            shards[shard] = {
                "size": path.stat().st_size,
                "header_sha256": header_sha256(path),
                "data_sample_sha256": data_sample_sha256(path),
            }
        index = self.path / INDEX_NAME
        index_hash = hashlib.sha256(index.read_bytes()).hexdigest() if index.exists() else None
        return {"index_sha256": index_hash, "shards": shards}


def check_shard(path: Path) -> dict[str, dict]:
    """A safetensors file's header (name -> dtype, shape, offsets), checked against the
    file: it parses, and the file holds exactly the bytes the header describes. A truncated
    or corrupt file is named with what is wrong, before any work starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise StreamSVDError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise StreamSVDError(
                f"{path} is truncated or corrupt: its header claims {length:,} bytes, the file "
                f"has {size:,}"
            )
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            end = max((info["data_offsets"][1] for info in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise StreamSVDError(f"{path} has a corrupt safetensors header: {exc}") from exc
    if size != 8 + length + end:
        what = "truncated" if size < 8 + length + end else "longer than its header says"
        raise StreamSVDError(
            f"{path} is {what}: its header describes {8 + length + end:,} bytes, the file "
            f"has {size:,}; copy or download it again"
        )
    return header


def shard_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape for one safetensors file, from its header alone."""
    with safe_open(path, "pt") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse NaN or inf weights, naming the tensor: compressed, they would turn every
    statistic and factor of the block into NaN. One float32 sum per tensor (no copy); only a
    non-finite sum is looked at more closely."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
            bad = sum(int((~torch.isfinite(rows)).sum()) for rows in t.reshape(-1).split(1 << 22))
            if bad:
                raise StreamSVDError(
                    f"{name} in {where} holds {bad:,} NaN or inf value(s): the checkpoint is "
                    "damaged (or was saved after a diverged training step); fix it first"
                )


def data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first byte, end) of its data within a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {
        name: (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
        for name, info in header.items()
    }


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header (names, dtypes, offsets)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise StreamSVDError(f"{path} is truncated: not a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        return hashlib.sha256(prefix + f.read(length)).hexdigest()


def data_sample_sha256(path: Path, span: int = 1 << 20) -> str:
    """SHA-256 of the first and the last `span` bytes of a file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(span)
        f.seek(max(0, size - span))
        return hashlib.sha256(head + f.read(span)).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode the user's umask gives
    a new file or folder. safetensors writes its files, and mkdtemp its folders, for
    their owner only: on a shared machine colleagues could not read the model."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def save_shard(
    tensors: dict[str, torch.Tensor],
    path: Path,
    durable: bool = True,
    before_rename: Callable[[], None] | None = None,
) -> str | None:
    """Write one safetensors shard to a temporary name, fsync it, rename it into place;
    returns its SHA-256, hashed from the bytes written (`written_sha256`), never read back.
    durable=False skips the fsyncs and the hash (benchmarking only). `before_rename` runs
    between writing and renaming (fault injection)."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O errors are not OSErrors: make them so
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp)) from exc
        follow_umask(tmp)
        if before_rename is not None:
            before_rename()
        digest = None
        if durable:
            fsync_path(tmp)
            digest = written_sha256(tmp, tensors)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return digest


def written_sha256(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the safetensors file just written from `tensors` (contiguous, in host
    memory): its header read back, then the tensors' bytes from memory in the header's
    order; the file read whole only if its data is not exactly those bytes end to end."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        header = f.read(struct.unpack("<Q", prefix)[0])
    entries = json.loads(header)
    entries.pop("__metadata__", None)
    layout = sorted((tuple(e["data_offsets"]), name) for name, e in entries.items())
    end = 0
    for (start, stop), name in layout:
        if start != end or stop - start != tensors[name].nbytes:
            return file_sha256(path)
        end = stop
    if len(prefix) + len(header) + end != path.stat().st_size:
        return file_sha256(path)
    digest = hashlib.sha256(prefix + header)
    for _, name in layout:
        digest.update(tensors[name].detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(out_dir: Path, weight_map: dict[str, str]) -> None:
    total = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(out_dir / shard, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                total += math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out_dir / INDEX_NAME, json.dumps(index, indent=2).encode())


_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config and other non-weight files (not config.json):
    their contents, with the modes the user's umask gives, not the input's."""
    import shutil

    for item in sorted(src.iterdir()):
        if item.is_file() and item.name != "config.json" and item.name != INDEX_NAME:
            if not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(item, dst / item.name)


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
CHECKPOINT_FOLDER = "the checkpoint folder that holds config.json and the safetensors"


def written_as_path(model: str) -> bool:
    """`./x`, `../x`, `/x`, `~/x`: a path however it looks otherwise, never a hub id."""
    return model in (".", "..") or model.startswith(("./", "../", "/", "~"))


def locate_checkpoint(model: str) -> str:
    """--model as a folder, or as a hub id (`org/name` where no such file or folder exists
    and it is not written as a path): huggingface_hub's local cache first, else downloaded
    into it file by file (weights as safetensors only), as every tool in this ecosystem
    does. Every command reads --model through here, so a mistake reads the same in each."""
    path = os.path.expanduser(model)
    if Path(path).exists() or written_as_path(model) or not HUB_ID.fullmatch(model):
        check_checkpoint_folder(model, Path(path))
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, allow_patterns=HUB_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(model, allow_patterns=HUB_FILES)
    except Exception as exc:  # offline, unknown repo, gated, network: all mean "not here"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StreamSVDError(
            f"--model {model}: no such folder, and as a hub id it is not in the local "
            f"Hugging Face cache and could not be downloaded ({reason}). Pass a local "
            f"checkpoint folder, or download it where the hub is reachable "
            f"(`hf download {model}`) and point HF_HOME at that cache"
        ) from exc


def check_checkpoint_folder(model: str, path: Path) -> None:
    """Refuse a --model `model` (at `path`, `~` expanded) that cannot be a checkpoint."""
    fix = f"--model takes {CHECKPOINT_FOLDER}"
    if not path.exists():
        raise StreamSVDError(f"--model {model}: no such folder ({os.path.abspath(path)}); {fix}")
    if not path.is_dir():
        raise StreamSVDError(f"--model {model} is a file; {fix}")
    if not (path / "config.json").is_file():
        raise StreamSVDError(f"--model {model} holds no config.json; {fix}")
