"""Do entropy-coded keys' GPU decoder launches run side by side? (caches.DecodeAhead)

    python benchmarks/ec_group_probe.py [TOKENS]

The default model's shape, 30 spectral-ec caches (decode.py) of TOKENS (8,192) coded
tokens: median ms of decoding one layer's keys, then N layers' submitted together
(one mx.eval), of a whole layer's fetch (decode, rebuild, RoPE, values) alone, with
and without decoding, and of whole decode steps.
"""
import sys

import numpy as np
from decode import fill, make_cache, random_model, timed

from veloxcore.caches import SpectralKVCache, link_decode_ahead
from veloxcore.kernels import kernel_backend

mx = __import__("mlx.core").core


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    if kernel_backend() == "reference":
        sys.exit("ec_group_probe.py times the GPU decoder: it needs a GPU backend")
    model = random_model("smollm2")
    rng = np.random.default_rng(0)
    caches = [make_cache("spectral-ec", 3, 64, layer.self_attn.rope, kernel_backend(), rng)
              for layer in model.layers]
    for c in caches:
        fill(c, 3, 64, tokens)
    mx.synchronize()

    def decode(layers):
        out = []
        for c in caches[:layers]:
            s = c.num_sinks
            out += [c._entropy_kernel().decode(c.parts[0][..., a:b, :], s + a)
                    for a, b in c.decode_spans()]
        return out

    spans = len(caches[0].decode_spans())
    print(f"{tokens} tokens, {spans} span(s) a layer", flush=True)
    for layers in (1, 2, 4, 7, 15, 30):
        ms = 1e3 * timed(lambda layers=layers: decode(layers), 20)
        print(f"decode {layers:2d} layers together: {ms:7.2f} ms", flush=True)
    ms = 1e3 * timed(lambda: list(caches[0].fetch(mx.float16)), 20)
    print(f"one layer's fetch (decode, rebuild, RoPE, values): {ms:.2f} ms", flush=True)
    original = caches[0]._entropy_kernel().decode
    zeros = {}

    def no_decode(codes, position):
        shape = (*codes.shape[:3], 64)
        if shape not in zeros:
            zeros[shape] = mx.zeros(shape, mx.float32)
        return zeros[shape]
    for c in caches:
        c._entropy_kernel().decode = no_decode
    ms = 1e3 * timed(lambda: list(caches[0].fetch(mx.float16)), 20)
    print(f"the same without decoding: {ms:.2f} ms", flush=True)
    token = mx.array([[1]])
    paced = SpectralKVCache.paced
    steps = 1e3 * timed(lambda: model(token, cache=caches), 10)
    print(f"a whole step without decoding: {steps:.2f} ms", flush=True)
    SpectralKVCache.paced = property(lambda self: False)
    steps = 1e3 * timed(lambda: model(token, cache=caches), 10)
    print(f"a whole step without decoding, unpaced: {steps:.2f} ms", flush=True)
    for c in caches:
        c._entropy_kernel().decode = original
    steps = 1e3 * timed(lambda: model(token, cache=caches), 10)
    print(f"a whole step (each layer on its own, unpaced): {steps:.2f} ms", flush=True)
    SpectralKVCache.paced = paced
    steps = 1e3 * timed(lambda: model(token, cache=caches), 10)
    print(f"a whole step (each layer on its own, paced): {steps:.2f} ms", flush=True)
    for group in (None, 15, 30):
        link_decode_ahead(caches, group)
        steps = 1e3 * timed(lambda: model(token, cache=caches), 10)
        print(f"a whole step (groups of {caches[0].decode_ahead.group}, paced): "
              f"{steps:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
