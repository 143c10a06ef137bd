"""Make MLX's CPU backend use an optimised BLAS on Linux.

The Linux wheel of MLX (``mlx-cpu``) links the reference BLAS, whose matmul is
about 45x slower than OpenBLAS. Loading Debian's OpenBLAS into the global
symbol scope *before* ``mlx.core`` is imported makes the dynamic linker resolve
MLX's ``cblas_*``/``sgemm_`` calls to OpenBLAS (global scope is searched before
the wheel's bundled library). This has the same effect as ``LD_PRELOAD`` but
needs no re-exec and works under pytest and the GUI alike.

Set ``VELOX_BLAS=reference`` to skip it, or ``VELOX_BLAS=/path/libblas.so.3``
to load another BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)

loaded_blas: str | None = None


def preload_blas() -> str | None:
    """Load an optimised BLAS globally; return its path, or None."""
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    choice = os.environ.get("VELOX_BLAS", "")
    if choice == "reference":
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before veloxcore, so OpenBLAS could not be "
            "preloaded; CPU matmuls use the slow reference BLAS.",
            stacklevel=3,
        )
        return None
    candidates = (choice,) if choice else OPENBLAS_CANDIDATES
    for path in candidates:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded_blas = path
            return path
    return None
