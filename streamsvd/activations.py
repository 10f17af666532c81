"""Hidden states between blocks, on disk in zarr, for two streams.

`orig` holds what the uncompressed model computes, `comp` what the compressed blocks so
far compute. Each stream has two slots used in turn: block i reads slot i % 2 and writes
slot (i + 1) % 2, so disk holds two boundaries per stream whatever the depth. Chunks are
one sample each; readers take micro-batches. bfloat16 is stored as an int16 view (zarr has
no bfloat16), as accelerate's offload does. Knows nothing about blocks or models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import zarr

STREAMS = ("orig", "comp")


class ActivationStore:
    def __init__(self, root: Path, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype):
        self.root = Path(root)
        self.shape = (nsamples, seqlen, hidden)
        self.dtype = dtype
        self._stored = torch.int16 if dtype == torch.bfloat16 else dtype
        self._group = zarr.open_group(str(self.root), mode="a")

    def _array(self, stream: str, slot: int, create: bool = False):
        name = f"{stream}{slot}"
        if create or name not in self._group:
            return self._group.create_array(
                name,
                shape=self.shape,
                chunks=(1, *self.shape[1:]),
                dtype=np.dtype(str(self._stored).removeprefix("torch.")),
                compressors=None,
                overwrite=True,
            )
        return self._group[name]

    def reset(self, stream: str, slot: int) -> None:
        """Start a slot afresh before writing it whole."""
        self._array(stream, slot, create=True)

    def read(self, stream: str, slot: int, start: int, stop: int) -> torch.Tensor:
        data = torch.from_numpy(np.ascontiguousarray(self._array(stream, slot)[start:stop]))
        return data.view(self.dtype) if self.dtype == torch.bfloat16 else data

    def write(self, stream: str, slot: int, start: int, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", self.dtype)
        if self.dtype == torch.bfloat16:
            values = values.view(torch.int16)
        self._array(stream, slot)[start : start + values.shape[0]] = values.numpy()

    def checksum(self, stream: str, slot: int, batch: int = 8) -> str:
        """SHA-256 of a slot's contents, read back from disk sample by sample."""
        digest = hashlib.sha256()
        for start in range(0, self.shape[0], batch):
            stop = min(start + batch, self.shape[0])
            digest.update(self.read(stream, slot, start, stop).view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()


def tensor_digest(digest, values: torch.Tensor, dtype: torch.dtype):
    """Feed what `write` stores into a running hash, in the same byte form `checksum` reads."""
    digest.update(values.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy())
    return digest
