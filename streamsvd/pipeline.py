"""The loop over blocks: load one block, stream calibration through it, factorise its
linears, advance both activation streams, write its shard, record it, free it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .activations import ActivationStore, tensor_digest
from .calib import calibration_windows, load_text, text_sha256, tokenize
from .checkpoint import (
    CheckpointReader,
    copy_side_files,
    file_sha256,
    save_shard,
    shard_name,
    shard_shapes,
    write_index,
)
from .errors import StreamSVDError
from .factorize import METHODS, Method, rank_for
from .journal import Journal
from .lowrank import SECTION, LowRankLinear, export_dense, replace_module
from .model import (
    build_skeleton,
    capture_inputs,
    catch_block_inputs,
    empty,
    fill,
    find_blocks,
    linear_layers,
    load_config,
    max_positions,
    param_name,
    run_block,
    shared_input_groups,
    to_device,
)
from .stats import InputStats

log = logging.getLogger(__name__)

DEFAULT_METHOD = "svdllm-a"


@dataclass(frozen=True)
class CompressConfig:
    model: str
    out: str
    ratio: float = 0.2
    method: str = DEFAULT_METHOD
    calib: str | None = None  # local text file, hub dataset name, or None for the default
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # calibration windows per forward
    device: str = "cpu"
    workdir: str | None = None  # default: <out>.work
    dense: bool = False
    restart: bool = False

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise StreamSVDError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise StreamSVDError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamSVDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise StreamSVDError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise StreamSVDError("--device cuda was asked for but no CUDA GPU is visible")

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(f"{self.out}.work")


class StageTimer:
    """Wall seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def streams_for(method: Method) -> tuple[str, ...]:
    """Which activation streams a method needs carried from block to block."""
    out = []
    if method.needs & {"orig", "cross"}:
        out.append("orig")
    if method.needs & {"comp", "cross"}:
        out.append("comp")
    return tuple(out)


class Compressor:
    """One compress run. Construct, then call run()."""

    def __init__(self, cfg: CompressConfig):
        self.cfg = cfg
        self.timer = StageTimer()
        self.out = Path(cfg.out)
        if self.out.exists():
            raise StreamSVDError(
                f"output {self.out} already exists; remove it or choose another --out"
            )
        self.device = torch.device(cfg.device)
        self.reader = CheckpointReader(cfg.model)
        self.config = load_config(cfg.model)
        self.dtype = self.reader.dtype()
        self.model = build_skeleton(self.config, self.dtype)
        self.prefix, self.blocks = find_blocks(self.model)
        self.method = METHODS[cfg.method]
        self.streams = streams_for(self.method)
        self.windows, calibration = self._calibration()
        self.journal = Journal(cfg.run_dir, self._manifest(calibration), restart=cfg.restart)
        self.shards = cfg.run_dir / "shards"
        self.shards.mkdir(exist_ok=True)
        self.store = None
        if self.streams:
            hidden = self.config.get_text_config().hidden_size
            self.store = ActivationStore(
                cfg.run_dir / "activations", cfg.nsamples, cfg.seqlen, hidden, self.dtype
            )

    # -- setup -------------------------------------------------------------------------
    def _calibration(self) -> tuple[torch.Tensor | None, dict]:
        if not self.method.needs:
            return None, {}
        cfg = self.cfg
        limit = max_positions(self.config.get_text_config())
        if limit is not None and cfg.seqlen > limit:
            raise StreamSVDError(
                f"seqlen {cfg.seqlen} exceeds the model's maximum of {limit} "
                "positions; lower --seqlen"
            )
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as exc:
            raise StreamSVDError(f"{cfg.model} has no usable tokenizer: {exc}") from exc
        text, source = load_text(cfg.calib)
        windows = calibration_windows(tokenize(tokenizer, text), cfg.nsamples, cfg.seqlen, cfg.seed)
        info = {
            "source": source,
            "text_sha256": text_sha256(text),
            "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen,
            "seed": cfg.seed,
        }
        return windows, info

    def _manifest(self, calibration: dict) -> dict:
        cfg = self.cfg
        return {
            "streamsvd_version": __version__,
            "model_fingerprint": self.reader.fingerprint(),
            "method": cfg.method,
            "ratio": cfg.ratio,
            "rank_policy": "floor((1 - ratio) * m * n / (m + n)) for every block linear",
            "calibration": calibration,
            "dtype": str(self.dtype),
            "batch_size": cfg.batch_size,
            "device_type": self.device.type,
        }

    # -- the run -----------------------------------------------------------------------
    def run(self) -> dict:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.cuda.reset_peak_memory_stats()
        n_blocks = len(self.blocks)
        first = self._resume_point()
        if first > 0 or self.journal.done("inputs"):
            log.info("resuming at block %d/%d", first + 1, n_blocks)
        block_kwargs = self._embedding_stage()
        bar = tqdm(total=n_blocks, initial=first, desc="Compressing", unit="block", disable=None)
        with torch.inference_mode():
            for i in range(first, n_blocks):
                if not self.journal.done(f"block.{i}"):
                    self._compress_block(i, block_kwargs)
                bar.update(1)
        bar.close()
        self._write_rest()
        return self._finish(time.perf_counter() - start)

    def _resume_point(self) -> int:
        """First block to compute. Anything the journal does not vouch for is redone;
        a bad shard of a block whose inputs are gone means starting over."""
        n_blocks = len(self.blocks)
        done = 0
        while done < n_blocks and self.journal.done(f"block.{done}"):
            done += 1
        for i in range(done):
            shard = self.shards / f"block-{i:05d}.safetensors"
            if (
                not shard.exists()
                or file_sha256(shard) != self.journal.entry(f"block.{i}")["sha256"]
            ):
                log.warning("shard of block %d is missing or corrupt: recomputing", i)
                return self._start_over(i)
        if self.streams and self.journal.done("inputs"):
            entry = self.journal.entry(f"block.{done - 1}" if done else "inputs")
            for stream in self.streams:
                if self.store.checksum(stream, done % 2) != entry["activations"][stream]:
                    log.warning(
                        "stored %s activations for block %d are corrupt: recomputing", stream, done
                    )
                    return self._start_over(0)
        return done

    def _start_over(self, bad_block: int) -> int:
        n_blocks = len(self.blocks)
        if not self.streams:  # blocks are independent: redo only the bad one onwards
            self.journal.forget_from([f"block.{i}" for i in range(bad_block, n_blocks)])
            return self._resume_point()
        self.journal.forget_from(["inputs", *(f"block.{i}" for i in range(n_blocks))])
        return 0

    def _embedding_stage(self) -> dict:
        """Fill the embedding, record block 0's inputs for every stream, return the keyword
        arguments every block is called with (position embeddings, mask)."""
        embed = self.model.get_input_embeddings()
        name = param_name(self.model, embed.weight)
        fill(self.model, {name: self.reader[name]}, "cpu")
        first = self.blocks[0]
        with torch.inference_mode():
            _, kwargs = catch_block_inputs(
                self.model, first, torch.zeros(1, self.cfg.seqlen, dtype=torch.long)
            )
            if self.streams and not self.journal.done("inputs"):
                with self.timer("forward"):
                    digests = {s: hashlib.sha256() for s in self.streams}
                    for stream in self.streams:
                        self.store.reset(stream, 0)
                    for start, stop in self._batches():
                        hidden, _ = catch_block_inputs(self.model, first, self.windows[start:stop])
                        for stream in self.streams:
                            self.store.write(stream, 0, start, hidden)
                            tensor_digest(digests[stream], hidden, self.dtype)
                self.journal.record(
                    "inputs", {"activations": {s: d.hexdigest() for s, d in digests.items()}}
                )
        empty(embed)
        return to_device(kwargs, self.device)

    def _batches(self):
        n, b = self.cfg.nsamples, self.cfg.batch_size
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def _compress_block(self, i: int, block_kwargs: dict) -> None:
        t0 = time.perf_counter()
        block = self.blocks[i]
        block_prefix = f"{self.prefix}.{i}"
        with self.timer("load"):
            names = self.reader.under(block_prefix)
            original = self.reader.tensors(names)
            fill(block, {n[len(block_prefix) + 1 :]: t for n, t in original.items()}, self.device)
        linears = linear_layers(block)
        stats, digests = {}, {}
        if self.streams:
            stats, digests["orig"] = self._collect_stats(i, block, list(linears), block_kwargs)
        ranks = {}
        out_tensors = {}
        with self.timer("factorize"):
            for name, linear in linears.items():
                m, n = linear.weight.shape
                rank = rank_for(m, n, self.cfg.ratio)
                A, B = self.method.factorize(linear.weight.double(), stats.get(name), rank)
                new = LowRankLinear.from_factors(A, B, linear.bias, self.dtype)
                replace_module(block, name, new)
                full = f"{block_prefix}.{name}"
                ranks[full] = rank
                out_tensors[f"{full}.down.weight"] = new.down.weight.cpu()
                out_tensors[f"{full}.up.weight"] = new.up.weight.cpu()
                if linear.bias is not None:
                    out_tensors[f"{full}.up.bias"] = original[f"{full}.bias"]
        for name, tensor in original.items():  # norms and the like: bit for bit
            if name.rsplit(".", 1)[0][len(block_prefix) + 1 :] not in linears:
                out_tensors[name] = tensor
        if "comp" in self.streams:
            digests["comp"] = self._advance_comp(i, block, block_kwargs)
        with self.timer("write"):
            sha = save_shard(out_tensors, self.shards / f"block-{i:05d}.safetensors")
        self.journal.record(f"block.{i}", {"sha256": sha, "ranks": ranks, "activations": digests})
        empty(block)
        log.info(
            "block %d/%d: ranks %s, %.1fs, peak RSS %.0f MB",
            i + 1,
            len(self.blocks),
            sorted(set(ranks.values())),
            time.perf_counter() - t0,
            peak_rss_mb(),
        )

    def _collect_stats(self, i: int, block, names: list[str], kwargs: dict) -> tuple[dict, str]:
        """Float64 statistics of every linear's inputs, shared within groups that read the
        same tensor; the dense block's outputs on the original stream are block i+1's input."""
        slot, nxt = i % 2, (i + 1) % 2
        needs = self.method.needs
        stats: dict[str, InputStats] = {}
        orig_digest = hashlib.sha256()
        self.store.reset("orig", nxt)
        for start, stop in self._batches():
            with self.timer("forward"):
                x = self.store.read("orig", slot, start, stop).to(self.device)
                with capture_inputs(block, names) as seen:
                    y = run_block(block, x, kwargs)
                self.store.write("orig", nxt, start, y)
                tensor_digest(orig_digest, y, self.dtype)
                seen_c = {}
                if needs & {"comp", "cross"}:
                    xc = self.store.read("comp", slot, start, stop).to(self.device)
                    with capture_inputs(block, names) as seen_c:
                        run_block(block, xc, kwargs)
            with self.timer("stats"):
                if not stats:
                    for group in shared_input_groups(seen):
                        shared = InputStats(seen[group[0]].shape[-1], needs, self.device)
                        stats.update({name: shared for name in group})
                done = set()
                for name, s in stats.items():
                    if id(s) not in done:
                        done.add(id(s))
                        s.add(
                            seen[name] if "orig" in needs or "cross" in needs else None,
                            seen_c.get(name),
                        )
        return stats, orig_digest.hexdigest()

    def _advance_comp(self, i: int, block, kwargs: dict) -> str:
        """Run the compressed block on the compressed stream: block i+1's compressed input."""
        slot, nxt = i % 2, (i + 1) % 2
        digest = hashlib.sha256()
        self.store.reset("comp", nxt)
        with self.timer("forward"):
            for start, stop in self._batches():
                y = run_block(
                    block, self.store.read("comp", slot, start, stop).to(self.device), kwargs
                )
                self.store.write("comp", nxt, start, y)
                tensor_digest(digest, y, self.dtype)
        return digest.hexdigest()

    def _write_rest(self) -> None:
        """Embedding, final norm, LM head: copied through unchanged in a shard of their own."""
        if self.journal.done("rest"):
            return
        names = [n for n in self.reader if not n.startswith(self.prefix + ".")]
        with self.timer("write"):
            sha = save_shard(self.reader.tensors(names), self.shards / "rest.safetensors")
        self.journal.record("rest", {"sha256": sha})

    def _finish(self, seconds: float) -> dict:
        """Assemble the output directory next to it, then rename it into place: an output
        directory that exists is a finished one."""
        cfg = self.cfg
        tmp = self.out.with_name(self.out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = ["rest.safetensors"] + [
            f"block-{i:05d}.safetensors" for i in range(len(self.blocks))
        ]
        weight_map, ranks = {}, {}
        for k, file in enumerate(files):
            target = shard_name(k + 1, len(files))
            _link_or_copy(self.shards / file, tmp / target)
            weight_map.update({n: target for n in shard_shapes(tmp / target)})
        for i in range(len(self.blocks)):
            ranks.update(self.journal.entry(f"block.{i}")["ranks"])
        write_index(tmp, weight_map)
        copy_side_files(Path(cfg.model), tmp)
        config = json.loads((Path(cfg.model) / "config.json").read_text())
        config[SECTION] = {
            "version": __version__,
            "method": cfg.method,
            "ratio": cfg.ratio,
            "calibration": self.journal.manifest["calibration"],
            "ranks": ranks,
            "complete": True,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, self.out)
        if cfg.dense:
            with self.timer("write"):
                export_dense(self.out, self.out)
        shutil.rmtree(cfg.run_dir)
        return self._summary(seconds, ranks)

    def _summary(self, seconds: float, ranks: dict) -> dict:
        shapes_before = self.reader.shapes()
        before = sum(math.prod(shape) for shape in shapes_before.values())
        after = sum(math.prod(shape) for shape in CheckpointReader(self.out).shapes().values())
        linear_before = linear_after = 0
        for name, rank in ranks.items():
            m, n = shapes_before[f"{name}.weight"]
            linear_before += m * n
            linear_after += rank * (m + n)
        summary = {
            "method": self.cfg.method,
            "ratio": self.cfg.ratio,
            "params_before": before,
            "params_after": after,
            "linear_params_before": linear_before,  # block linears' weights, biases excluded
            "linear_params_after": linear_after,
            "size_on_disk_bytes": sum(p.stat().st_size for p in self.out.iterdir()),
            "seconds": round(seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in sorted(self.timer.seconds.items())},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if self.device.type == "cuda":
            summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def compress(cfg: CompressConfig) -> dict:
    """Compress cfg.model into cfg.out; returns the run's summary."""
    return Compressor(cfg).run()
