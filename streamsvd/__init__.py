"""streamsvd: SVD-LLM compression of large language models, one decoder block at a time."""

__version__ = "0.1.0"

from .lowrank import export_dense, load_compressed  # noqa: E402
from .modeling import LowRankLinear  # noqa: E402
from .pipeline import CompressConfig, compress  # noqa: E402

__all__ = ["CompressConfig", "LowRankLinear", "compress", "export_dense", "load_compressed"]
