"""What the checkpoint's content hashes cost (streamsvd/sources.py), at Llama-2-70B width.

    nice -n 10 .venv/bin/python benchmarks/fingerprint_cost.py
    nice -n 10 .venv/bin/python benchmarks/fingerprint_cost.py --dir /mnt/nvme --read-mib 2048

A run hashes every checkpoint tensor each block reads, from the bytes already in memory.
This times that hash over one Llama-2-70B block's tensors (hidden 8192, intermediate 28672,
64 query / 8 key-value heads, bf16: 1.71 GB), made of random bytes in memory in 256 MiB
chunks (no 1.7 GB file), with SHA-256 and BLAKE2b, and through `tensor_sha256` itself on
one 256 MiB bf16 tensor. Against it: reading a --read-mib safetensors file of such a
block's matrices back, cold (its pages dropped from the cache with posix_fadvise) and warm
(from the page cache), as a block's load reads them; a block's read time is scaled from
that rate. One process, one thread; the fastest of --repeats. Writes
benchmarks/results/fingerprint_cost.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from streamsvd.sources import tensor_sha256  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 8192, 28672, 64, 8
CHUNK = 256 << 20


def block_shapes() -> dict[str, tuple[int, ...]]:
    """One Llama-2-70B decoder block's tensors."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
            "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            "input_layernorm.weight": (HIDDEN,),
            "post_attention_layernorm.weight": (HIDDEN,)}  # fmt: skip


def block_bytes() -> int:
    return sum(2 * torch.Size(s).numel() for s in block_shapes().values())  # bf16


def hash_seconds(algorithm: str, total: int, chunk: bytes) -> float:
    """Seconds to hash `total` bytes, fed a chunk at a time, tensor by tensor."""
    start = time.perf_counter()
    for shape in block_shapes().values():
        digest = hashlib.new(algorithm)
        left = 2 * torch.Size(shape).numel()
        while left > 0:
            digest.update(memoryview(chunk)[: min(left, len(chunk))])
            left -= len(chunk)
        digest.hexdigest()
    seconds = time.perf_counter() - start
    assert total == block_bytes()
    return seconds


def read_seconds(path: Path, cold: bool) -> float:
    """Seconds to read every tensor of a safetensors file as a block's load does."""
    if cold:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.perf_counter()
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for t in tensors.values():  # touch every page, as check_finite does
        t.sum(dtype=torch.float32)
    return time.perf_counter() - start


def write_file(path: Path, mib: int) -> int:
    """A safetensors file of bf16 matrices of the block's width, `mib` MiB in all."""
    gen = torch.Generator().manual_seed(0)
    tensors, left, k = {}, mib << 20, 0
    while left > 0:
        rows = min(INTERMEDIATE, left // (2 * HIDDEN))
        tensors[f"w{k}"] = torch.randn((rows, HIDDEN), generator=gen).to(torch.bfloat16)
        left -= 2 * rows * HIDDEN
        k += 1
    save_file(tensors, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the read file goes")
    parser.add_argument("--read-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fingerprint_cost"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    total = block_bytes()
    chunk = os.urandom(CHUNK)
    results = {"block_bytes": total}
    for algorithm in ("sha256", "blake2b"):
        best = min(hash_seconds(algorithm, total, chunk) for _ in range(args.repeats))
        results[f"{algorithm}_block_seconds"] = round(best, 3)
        results[f"{algorithm}_gb_per_s"] = round(total / best / 1e9, 3)
    sample = torch.frombuffer(bytearray(chunk), dtype=torch.bfloat16).view(-1, HIDDEN)
    best = min(_timed(lambda: tensor_sha256(sample)) for _ in range(args.repeats))
    results["tensor_sha256_gb_per_s"] = round(CHUNK / best / 1e9, 3)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "block.safetensors"
        size = write_file(path, args.read_mib)
        for how in ("cold", "warm"):
            best = min(read_seconds(path, how == "cold") for _ in range(args.repeats))
            results[f"read_{how}_gb_per_s"] = round(size / best / 1e9, 3)
            results[f"read_{how}_block_seconds"] = round(total / (size / best), 3)
    results["hash_share_of_cold_read"] = round(
        results["sha256_block_seconds"] / results["read_cold_block_seconds"], 3
    )
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    results["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs slow every row
    results["command"] = "nice -n 10 .venv/bin/python benchmarks/fingerprint_cost.py " + " ".join(
        sys.argv[1:]
    )
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown(r: dict) -> str:
    gb = r["block_bytes"] / 1e9
    return (
        "# The checkpoint's content hashes at Llama-2-70B width\n\n"
        f"`{r['command'].strip()}` ({r['machine']}, load average {r['load_average_1min']} "
        "at the end: the machine was shared, which slows every row alike; one thread, "
        "fastest of the repeats)\n\n"
        f"One decoder block's tensors, bf16: {gb:.2f} GB.\n\n"
        "| per block | seconds | GB/s |\n|---|---|---|\n"
        f"| SHA-256 of its tensors (hashlib) | {r['sha256_block_seconds']} "
        f"| {r['sha256_gb_per_s']} |\n"
        f"| BLAKE2b of its tensors (hashlib) | {r['blake2b_block_seconds']} "
        f"| {r['blake2b_gb_per_s']} |\n"
        f"| `tensor_sha256` (the run's, on a bf16 tensor) | "
        f"{round(gb / r['tensor_sha256_gb_per_s'], 3)} | {r['tensor_sha256_gb_per_s']} |\n"
        f"| reading it from safetensors, cold | {r['read_cold_block_seconds']} "
        f"| {r['read_cold_gb_per_s']} |\n"
        f"| reading it from safetensors, page cache | {r['read_warm_block_seconds']} "
        f"| {r['read_warm_gb_per_s']} |\n\n"
        f"SHA-256 costs {r['hash_share_of_cold_read']:.0%} of a cold read of the same block.\n"
    )


if __name__ == "__main__":
    main()
