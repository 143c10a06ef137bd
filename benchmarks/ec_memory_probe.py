"""Where a spectral-ec cache's peak memory comes from on the GPU (decode.py's e2e row).

    python benchmarks/ec_memory_probe.py [VARIANT ...]

The default model's shape (random weights), 30 caches filled with 8,192 tokens, then
decode steps; active and peak memory (MiB above the model) after the fill and after
steps, for entropy-coded keys coded and decoded by the GPU kernels (as shipped: paced,
caches.pace, and decoded in groups of layers, caches.DecodeAhead; "gpu-g1": each layer
on its own; "gpu-unpaced": neither), with the host's decoder, with the host's encoder,
and for decode.py's spectral-unfused (no +ec).
"""
import sys

import numpy as np
from decode import fill, make_cache, random_model

from veloxcore import kernels
from veloxcore.caches import SpectralKVCache, link_decode_ahead
from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core

VARIANTS = {"gpu": {"groups": True}, "gpu-g1": {}, "gpu-unpaced": {"unpaced": True},
            "host-decode": {"decode": True},
            "host-encode": {"encode": True}, "spectral-unfused": {}}


def run(name: str, steps: int) -> None:
    method = "spectral-unfused" if name == "spectral-unfused" else "spectral-ec"
    model = random_model("smollm2")
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    caches = [make_cache(method, 3, 64, layer.self_attn.rope, kernel_backend(),
                         np.random.default_rng(0)) for layer in model.layers]
    if VARIANTS[name].get("groups"):
        link_decode_ahead(caches)
    for c in caches:
        if VARIANTS[name].get("decode"):
            c._entropy_kernel = lambda: None  # noqa: B023 — host numpy decoding and coding
        fill(c, 3, 64, 8192)
    mx.synchronize()
    mib = lambda x: round((x - base) / 2**20, 1)  # noqa: E731
    out = [f"fill {mib(mx.get_active_memory())}/{mib(mx.get_peak_memory())}"]
    mx.reset_peak_memory()
    token = mx.array([[1]])
    for step in range(steps):
        token = mx.argmax(model(token, cache=caches)[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
        if step in (0, 1, 5, steps - 1):
            out.append(f"step {step} {mib(mx.get_active_memory())}/{mib(mx.get_peak_memory())}")
    print(name, "active/peak MiB:", "; ".join(out), flush=True)


def main() -> None:
    gpu = kernel_backend() != "reference"
    for name in sys.argv[1:] or VARIANTS:
        original = kernels.EntropyKernels.__init__
        if VARIANTS[name].get("encode"):
            def host_encoding(self, *args, original=original, **kw):
                original(self, *args, **kw)
                self.encodes = False
            kernels.EntropyKernels.__init__ = host_encoding
        paced = SpectralKVCache.paced
        if VARIANTS[name].get("unpaced"):
            SpectralKVCache.paced = property(lambda self: False)
        try:
            run(name, 12 if gpu else 2)
        finally:
            kernels.EntropyKernels.__init__ = original
            SpectralKVCache.paced = paced
        mx.clear_cache()


if __name__ == "__main__":
    main()
