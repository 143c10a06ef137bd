"""Probe: how much each layer's compressed keys and values cost (CPU).

    python benchmarks/layer_sensitivity_probe.py [--tokens 1024] [--json OUT]

For each layer alone (every other layer keeps mlx-lm's fp16 cache), the KL against
fp16 of the held-out text when that layer's keys are coded at 2 and at 3 water-filled
bits (values at 8-bit affine, near exact) and when its values are coded at 3 and at 4
affine bits (keys at 5 water-filled bits, near exact). If the layers' costs differ a
lot, one shared budget allocated by measured sensitivity beats the same bits everywhere.
"""

import argparse
import json

from probe_text import HeldOut, KVCache

from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method

COMMON = "+qa+ad+x1.5+vh"
CONFIGS = {
    "keys2": "spectral:wf2/a8g64" + COMMON,
    "keys3": "spectral:wf3/a8g64" + COMMON,
    "values3": "spectral:wf5/a3g64" + COMMON,
    "values4": "spectral:wf5/a4g64" + COMMON,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--bundle", default="assets/bundles/smollm2-135m-instruct-pre")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    held_out = HeldOut(args.tokens, args.chunk)
    model = held_out.model
    rotations = load_cached_rotations(args.bundle, model=model)
    rows = []
    for name, spec in CONFIGS.items():
        config = parse_method(spec, rotations)
        whole = held_out.kl(KVCacheBuilder.build(model, config)).mean().item()
        per_layer = []
        for layer in range(len(model.layers)):
            caches = [KVCache() for _ in model.layers]
            caches[layer] = KVCacheBuilder.build(model, config)[layer]
            per_layer.append(held_out.kl(caches).mean().item())
            print(f"{name} layer {layer:2d} KL {per_layer[-1]:.5f}", flush=True)
        rows.append(dict(config=name, spec=spec, all_layers=whole, per_layer=per_layer,
                         sum_of_layers=sum(per_layer)))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, chunk=args.chunk, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
