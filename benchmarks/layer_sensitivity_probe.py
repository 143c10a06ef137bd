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

from probe_text import HeldOut

from veloxcore import load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method
from veloxcore.sensitivity import probe_specs, run_sensitivity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--bundle", default="assets/bundles/smollm2-135m-instruct-pre")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    held_out = HeldOut(args.tokens, args.chunk)
    model = held_out.model
    rotations = load_cached_rotations(args.bundle, model=model, layer_sensitivity=False)
    # The same single-layer measurement as `velox sensitivity`, on the held-out text.
    per_layer = run_sensitivity(model, rotations, held_out.inputs[0].tolist(),
                                chunk=args.chunk,
                                progress=lambda s, d, t: print(s, flush=True))
    rows = []
    for part, table in probe_specs(rotations.has_key_importance, 64).items():
        costs = getattr(per_layer, part)
        for bits, spec in table.items():
            config = parse_method(spec, rotations)
            whole = held_out.kl(KVCacheBuilder.build(model, config)).mean().item()
            layers = costs[bits].tolist()
            rows.append(dict(config=f"{part}{bits:g}", spec=spec, all_layers=whole,
                             per_layer=layers, sum_of_layers=sum(layers)))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, chunk=args.chunk, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
