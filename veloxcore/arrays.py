"""Host (numpy) arrays to MLX."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def as_mx(x: np.ndarray) -> mx.array:
    """``x`` as a row-contiguous MLX array. ``mx.array`` keeps a numpy array's strides
    (a fancy-indexed or transposed view becomes a column-major MLX array), and a custom
    kernel copies a non-row-contiguous input on every launch: on an H200 that was one extra
    copy kernel per layer and decode step (the key mean in RoPE pair order)."""
    return mx.array(np.ascontiguousarray(x))
