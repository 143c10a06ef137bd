"""Decoding entropy-coded keys (``+ec``) on the GPU against the host, one layer.

    python benchmarks/entropy_gpu.py --shapes smollm2,8b --contexts 4096,16384,65536

For each model shape (decode.py's) and context N: an EntropyKeyCoder at 2.75 bits per
key dim with the default model's key spectrum (decode.py's ``spectra``) codes 32 blocks
per head on the host; the blocks repeat to N tokens after 4 sinks (decoding time does not
depend on which blocks they are). Reports the median time to decode all of one layer's
key blocks with ``kernels.EntropyKernels`` (evaluated on its own, synchronised), the
same for the host decoder (numpy, ``coder.decode``, including the copy of the codes back
from the GPU) up to ``--host-max`` tokens, and the symbols decoded per second; and the
time to code one batch of 32 tokens (the cache's append batch) with
``kernels.EntropyKernels.encode`` and with the host's numpy coder.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from decode import SHAPES, device_name, spectra, timed

from veloxcore.entropy import EntropyKeyCoder
from veloxcore.kernels import EntropyKernels, kernel_backend

mx = __import__("mlx.core").core


def layer_codes(coder, tokens: int, rng) -> mx.array:
    """Codes of ``tokens`` tokens after 4 sinks: a short first block of 28 tokens, then
    32-token blocks repeating 32 coded ones."""
    H, D = coder.heads, coder.dims
    sigma = 2.0 ** coder.log2_sigma
    y = (rng.laplace(0, 1, (1, H, 28 + 32 * 32, D)) * sigma[None, :, None, :]
         / np.sqrt(2)).astype(np.float32)
    codes = np.array(coder.encode(mx.array(y), position=4))
    first, blocks = codes[:, :, :28], codes[:, :, 28:]
    reps = -(-(tokens - 28) // blocks.shape[2])
    body = np.concatenate([blocks] * reps, axis=2)[:, :, : (tokens - 28) // 32 * 32]
    return mx.array(np.concatenate([first, body], axis=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2,8b")
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--bits", type=float, default=2.75)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--host-max", type=int, default=4096)
    args = parser.parse_args()
    backend = kernel_backend()
    print(json.dumps(dict(device=device_name(), backend=backend)))
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        H, D = SHAPES[shape]["num_key_value_heads"], SHAPES[shape]["head_dim"]
        lam_k, _ = spectra(D)
        coder = EntropyKeyCoder(np.sqrt(np.stack([lam_k] * H)), args.bits)
        gpu = EntropyKernels(coder, backend) if backend != "reference" else None
        for tokens in (int(t) for t in args.contexts.split(",")):
            codes = layer_codes(coder, tokens, rng)
            L = codes.shape[2]
            row = dict(shape=shape, tokens=L, code_mib=codes.nbytes / 2**20)
            if gpu is not None:
                y, status = gpu.decode_with_status(codes, 4)
                assert not np.any(np.array(status))
                if L <= args.host_max:
                    assert np.array_equal(np.array(y), np.array(coder.decode(codes, 4)))
                t = timed(lambda: gpu.decode(codes, 4), args.reps)  # noqa: B023
                row.update(gpu_us=t * 1e6, gpu_msymbols_per_s=H * L * D / t / 1e6)
            if L <= args.host_max:
                t = timed(lambda: coder.decode(codes, 4), 3)  # noqa: B023
                row.update(host_us=t * 1e6, host_msymbols_per_s=H * L * D / t / 1e6)
            print(json.dumps(row))
        batch = mx.array((rng.laplace(0, 1, (1, H, 32, D)) * np.sqrt(lam_k)[None, None, None]
                          / np.sqrt(2)).astype(np.float32))
        mx.eval(batch)
        row = dict(shape=shape, encode_tokens=32)
        if gpu is not None:
            assert np.array_equal(np.array(gpu.encode(batch, 32)),
                                  np.array(coder.encode(batch, 32)))
            row["gpu_encode_us"] = 1e6 * timed(lambda: gpu.encode(batch, 32),  # noqa: B023
                                                        args.reps)
        row["host_encode_us"] = 1e6 * timed(lambda: coder.encode(batch, 32), 5)  # noqa: B023
        print(json.dumps(row))


if __name__ == "__main__":
    main()
