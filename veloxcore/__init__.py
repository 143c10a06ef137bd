"""veloxcore: SpectralQuant KV-cache compression on MLX (no Qt here).

The public names below load lazily, so numpy-only modules (``veloxcore.spectral``)
can be used without importing MLX — the studio's GUI thread relies on that.
"""

import importlib

__version__ = "0.1.0"

# Must run before anything imports mlx.core (see _blas.py).
from ._blas import preload_blas

preload_blas()

_EXPORTS = {
    "BundleError": "bundle",
    "load_cached_rotations": "bundle",
    "save_rotations": "bundle",
    "CalibrationCancelled": "calibration",
    "CalibrationError": "calibration",
    "CalibrationProgress": "calibration",
    "SpectralRotation": "calibration",
    "SpectralRotations": "calibration",
    "calibrate_spectral_rotation": "calibration",
    "CacheConfigError": "caches",
    "KVCacheBuilder": "caches",
    "KVCacheConfig": "caches",
    "parse_method": "caches",
    "Corpus": "corpus",
    "load_corpus": "corpus",
    "ModelLoadError": "errors",
    "VeloxError": "errors",
    "DEFAULT_MODEL": "models",
    "ModelInfo": "models",
    "load": "models",
    "allocate_bit_plan": "spectral",
    "compute_participation_ratio": "spectral",
    "compute_spectral_gap": "spectral",
    "predicted_distortion": "spectral",
    "water_fill_bits": "spectral",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'veloxcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
