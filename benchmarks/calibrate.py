"""Calibration cost on the default model vs a plain forward pass over the same tokens.

    python benchmarks/calibrate.py --samples 64 --seq-len 1024 --json out.json

Reports wall time of a plain forward pass (logits evaluated) over the calibration
windows, calibration in "pre" and "post" RoPE modes, their ratios, and MLX peak
memory for a small and the full sample count (it must not grow with samples).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from veloxcore import calibrate_spectral_rotation, load, load_corpus
from veloxcore.corpus import sample_windows

# veloxcore must load OpenBLAS before mlx.core is first imported.
mx = __import__("mlx.core").core


def plain_forward(model, windows) -> float:
    start = time.perf_counter()
    for window in windows:
        mx.eval(model(mx.array(window)[None]))
    return time.perf_counter() - start


def calibrate(model, tokenizer, corpus, samples, seq_len, rope) -> tuple[float, int]:
    mx.reset_peak_memory()
    start = time.perf_counter()
    calibrate_spectral_rotation(model, tokenizer, num_samples=samples, sequence_length=seq_len,
                                corpus=corpus, rope=rope)
    return time.perf_counter() - start, mx.get_peak_memory()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--small-samples", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()

    model, tokenizer, info = load(args.model)
    corpus = load_corpus("bundled")
    windows = sample_windows(tokenizer.encode(corpus.text), args.samples, args.seq_len, 0)
    mx.reset_peak_memory()
    forward_s = plain_forward(model, windows)
    forward_peak = mx.get_peak_memory()
    result = {
        "model": info.name, "device": str(mx.default_device()), "dtype": info.dtype,
        "machine": f"{platform.machine()}, {platform.system()}", "samples": args.samples,
        "seq_len": args.seq_len, "date": time.strftime("%Y-%m-%d"),
        "forward_s": forward_s, "forward_peak_bytes": forward_peak,
        "forward_tokens_per_s": args.samples * args.seq_len / forward_s,
    }
    for rope in ("pre", "post"):
        seconds, peak = calibrate(model, tokenizer, corpus, args.samples, args.seq_len, rope)
        _, small_peak = calibrate(model, tokenizer, corpus, args.small_samples, args.seq_len, rope)
        result[rope] = {"seconds": seconds, "ratio_to_forward": seconds / forward_s,
                        "tokens_per_s": args.samples * args.seq_len / seconds,
                        "peak_bytes": peak, f"peak_bytes_{args.small_samples}_samples": small_peak}
        print(f"{rope:>4}: {seconds:7.1f} s  ({seconds / forward_s:.2f}x forward)  "
              f"peak {peak / 2**20:.0f} MiB ({small_peak / 2**20:.0f} MiB at "
              f"{args.small_samples} samples)", flush=True)
    print(f"forward: {forward_s:.1f} s, {result['forward_tokens_per_s']:.0f} tok/s, "
          f"peak {forward_peak / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
