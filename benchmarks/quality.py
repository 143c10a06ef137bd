"""Quality-vs-bits frontier of KV-cache methods on the default model (the 8k sweep).

    python benchmarks/quality.py --model PATH.gguf --ctx 8192 --out DIR

Calibrates pre- and post-RoPE rotations (64 x 1024 tokens of the bundled corpus),
saves both bundles under DIR, then evaluates every method teacher-forced on the
held-out text and writes DIR/quality.json and DIR/quality.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from veloxcore import calibrate_spectral_rotation, load, load_cached_rotations, save_rotations
from veloxcore.caches import parse_method
from veloxcore.evaluate import evaluate_methods, load_eval_text, results_table

BASELINES = ["fp16", "affine8", "affine4", "affine4g32", "affine3", "affine3g32", "affine2",
             "affine2g32", "rvq4", "rvq3", "rvq2"]
SPECTRAL_PRE = [
    "spectral:4/1/2",  # the seed's headline configuration
    "spectral:wf1.5/a4g64", "spectral:wf2/a4g64", "spectral:wf2.5/a4g64", "spectral:wf3/a4g64",
    "spectral:wf3.5/a4g64", "spectral:wf4/a4g64",
    "spectral:wf2/a3g64", "spectral:wf2.5/a3g64", "spectral:wf3/a3g64", "spectral:wf2/a2g64",
    "spectral:wf3/a4g32", "spectral:wf3/3", "spectral:wf3/4",
    "spectral:wf3/a4g64x1", "spectral:wf3/a4g64x1.5", "spectral:wf3/a4g64x3",
    "spectral:wf3/a4g64+ts", "spectral:wf3/a4g64x1+ts",
]
SPECTRAL_POST = ["spectral:wf3/a4g64", "spectral:wf3/3"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--ctx", default="8192")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=0)
    parser.add_argument("--bundles", help="reuse bundles in this folder (pre/, post/)")
    parser.add_argument("--bundle", help="reuse this pre-RoPE bundle (with --methods)")
    parser.add_argument("--methods", help="comma-separated specs instead of the full sweep")
    parser.add_argument("--quick", action="store_true", help="a few methods only")
    parser.add_argument("--text", help="held-out text file (default: the bundled one)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, info = load(args.model, dequantize=True)
    rotations = {}
    if args.bundle:
        rotations["pre"] = load_cached_rotations(args.bundle, model=model)
    for mode in ("pre", "post"):
        if args.bundle:
            break
        if args.bundles:
            rotations[mode] = load_cached_rotations(Path(args.bundles) / mode, model=model)
            continue
        start = time.perf_counter()
        rotations[mode] = calibrate_spectral_rotation(model, tokenizer, args.samples,
                                                      args.seq_len, rope=mode)
        print(f"calibrated {mode}: {time.perf_counter() - start:.1f} s", flush=True)
        save_rotations(rotations[mode], out / mode)
    baselines, pre, post = BASELINES, SPECTRAL_PRE, SPECTRAL_POST
    if args.quick:
        baselines, pre, post = ["fp16", "affine4", "rvq3"], ["spectral:wf3/3",
                                                             "spectral:wf3/a4g64x2.5+ts"], []
    if args.methods:
        configs = {m: parse_method(m, rotations["pre"]) for m in args.methods.split(",")}
    else:
        configs = {m: parse_method(m, rotations["pre"]) for m in baselines}
        configs.update({f"{m} pre": parse_method(m, rotations["pre"]) for m in pre})
        configs.update({f"{m} post": parse_method(m, rotations["post"]) for m in post})
    name, text, sha = load_eval_text(args.text)
    results = []
    for ctx in [int(c) for c in args.ctx.split(",")]:
        start = time.perf_counter()
        results += evaluate_methods(model, tokenizer, configs, text, ctx, chunk=args.chunk,
                                    decode_tokens=args.decode_tokens)
        print(f"ctx {ctx}: {time.perf_counter() - start:.1f} s", flush=True)
    table = results_table(results)
    print(table)
    import mlx.core as mx

    meta = {"model": info.name, "device": str(mx.default_device()), "dtype": info.dtype,
            "text": name, "text_sha256": sha, "samples": args.samples, "seq_len": args.seq_len,
            "chunk": args.chunk, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "quality.json").write_text(json.dumps({**meta, "results": [r.to_dict()
                                                                       for r in results]},
                                                  indent=2))
    (out / "quality.md").write_text(json.dumps(meta) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
