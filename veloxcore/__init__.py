"""veloxcore: SpectralQuant KV-cache compression on MLX (no Qt here)."""

__version__ = "0.1.0"

# Must run before anything imports mlx.core (see _blas.py).
from ._blas import preload_blas

preload_blas()

from .errors import ModelLoadError, VeloxError  # noqa: E402
from .models import DEFAULT_MODEL, ModelInfo, load  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "ModelLoadError",
    "VeloxError",
    "load",
]
