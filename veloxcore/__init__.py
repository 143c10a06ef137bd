"""veloxcore: SpectralQuant KV-cache compression on MLX (no Qt here)."""

__version__ = "0.1.0"

# Must run before anything imports mlx.core (see _blas.py).
from ._blas import preload_blas

preload_blas()

from .bundle import BundleError, load_cached_rotations, save_rotations  # noqa: E402
from .calibration import (  # noqa: E402
    CalibrationCancelled,
    CalibrationError,
    CalibrationProgress,
    SpectralRotation,
    SpectralRotations,
    calibrate_spectral_rotation,
)
from .corpus import Corpus, load_corpus  # noqa: E402
from .errors import ModelLoadError, VeloxError  # noqa: E402
from .models import DEFAULT_MODEL, ModelInfo, load  # noqa: E402
from .spectral import (  # noqa: E402
    allocate_bit_plan,
    compute_participation_ratio,
    compute_spectral_gap,
    predicted_distortion,
    water_fill_bits,
)

__all__ = [
    "DEFAULT_MODEL",
    "BundleError",
    "CalibrationCancelled",
    "CalibrationError",
    "CalibrationProgress",
    "Corpus",
    "ModelInfo",
    "ModelLoadError",
    "SpectralRotation",
    "SpectralRotations",
    "VeloxError",
    "allocate_bit_plan",
    "calibrate_spectral_rotation",
    "compute_participation_ratio",
    "compute_spectral_gap",
    "load",
    "load_cached_rotations",
    "load_corpus",
    "predicted_distortion",
    "save_rotations",
    "water_fill_bits",
]
