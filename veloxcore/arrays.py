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


# MLX's CUDA allocator serves every array of at most 8 bytes from one pool of unified
# memory that stays mapped for the GPU without migrating (mlx/backend/cuda/allocator.cpp,
# SmallSizePool: cudaMemAdviseSetAccessedBy); a scalar the host wrote therefore sits in
# host memory, and a kernel that reads it waits for the bus. Kernel inputs are made
# longer than that, so they live (after their first use) in device memory.
KERNEL_INPUT_MIN_BYTES = 16


def padded_input(x: mx.array) -> mx.array:
    """A 1-D kernel input ``x`` (e.g. one value per KV head), zero-padded to at least
    KERNEL_INPUT_MIN_BYTES."""
    if x.ndim != 1:
        raise ValueError(f"a padded kernel input is 1-D, got shape {x.shape}")
    short = -(-KERNEL_INPUT_MIN_BYTES // x.itemsize) - x.size
    return x if short <= 0 else mx.concatenate([x, mx.zeros((short,), x.dtype)])


def kernel_input(values, dtype) -> mx.array:
    """A 1-D kernel input holding ``values`` (a sequence of numbers), zero-padded to at
    least KERNEL_INPUT_MIN_BYTES; kernels read only the leading entries."""
    return padded_input(mx.array(list(values), dtype=dtype))
