"""streamsvd: SVD-LLM compression of large language models, one decoder block at a time."""

__version__ = "0.1.0"

__all__ = ["CompressConfig", "LowRankLinear", "compress", "export_dense", "load_compressed"]

_HOMES = {"CompressConfig": "config", "compress": "run", "LowRankLinear": "modeling",
          "export_dense": "lowrank", "load_compressed": "lowrank"}  # fmt: skip


def __getattr__(name: str):
    """The public names, imported on first use: `import streamsvd` does not load torch,
    so that OpenMP settings made after it (OMP_WAIT_POLICY) still take effect."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
