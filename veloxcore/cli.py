"""The ``velox`` command line: everything the studio does, scriptable."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__
from .calibration import CalibrationCancelled
from .errors import VeloxError
from .units import format_bytes


def model_card_lines(info) -> list[str]:
    """The model card as aligned text lines (shared by `info` and `chat`)."""
    rows = [
        ("name", info.name),
        ("architecture", info.architecture),
        ("layers", info.num_layers),
        ("query heads", info.num_heads),
        ("KV heads", info.num_kv_heads),
        ("head dim", info.head_dim),
        ("hidden size", info.hidden_size),
        ("vocab", info.vocab_size),
        ("context", info.context_length),
        ("RoPE", f"theta={info.rope_theta:g}, traditional={info.rope_traditional}, "
                 f"scaling={info.rope_scaling}"),
        ("weights", f"{format_bytes(info.weight_bytes)} ({info.dtype})"),
        ("quantization", info.quantization),
        ("fp16 KV / token", format_bytes(info.kv_bytes_per_token())),
        ("fp16 KV @ context", format_bytes(info.kv_bytes_per_token() * info.context_length)),
        ("model dir", info.model_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def cmd_info(args) -> int:
    from .models import load

    _, _, info = load(args.source)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print("\n".join(model_card_lines(info)))
    return 0


def build_cli_cache(args, model):
    """The prompt cache the chat/eval flags ask for (None: mlx-lm's default)."""
    from .caches import KVCacheBuilder, KVCacheConfig, parse_method

    if args.method in (None, "fp16"):
        return None
    rotations = None
    if args.method.startswith("spectral"):
        if not args.bundle:
            raise VeloxError("--method spectral needs --bundle DIR (run `velox calibrate`)")
        from .bundle import load_cached_rotations

        rotations = load_cached_rotations(args.bundle, model=model,
                                          allow_model_mismatch=args.allow_model_mismatch)
    if args.method == "spectral":
        explicit = (args.signal_bits, args.noise_bits, args.value_bits, args.avg_bits)
        if all(v is None for v in explicit):
            config = KVCacheConfig.recommended(rotations)
        else:
            config = KVCacheConfig(method="spectral", rotations=rotations,
                                   signal_bits=args.signal_bits or 4,
                                   noise_bits=args.noise_bits if args.noise_bits is not None else 1,
                                   value_bits=args.value_bits or 2)
            if args.avg_bits is not None:
                config.use_water_filling, config.target_avg_bits = True, args.avg_bits
    else:
        config = parse_method(args.method, rotations)
    return KVCacheBuilder.build(model, config)


def cmd_chat(args) -> int:
    from .caches import cache_memory
    from .generate import stream_reply
    from .models import load

    model, tokenizer, info = load(args.model)
    cache = build_cli_cache(args, model)
    label = args.method or "fp16"
    if getattr(cache, "kernel_backend", None):
        label += f" (fused {cache.kernel_backend} decode kernels)"
    print(f"{info.name}: {info.num_layers} layers, {info.dtype}, KV cache {label}. "
          "Empty line or Ctrl-D quits.", file=sys.stderr)
    for note in getattr(cache, "notes", []):
        print(f"note: {note}", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            text = prompts.pop()
        else:
            try:
                text = input("> ").strip()
            except EOFError:
                return 0
            if not text:
                return 0
        messages.append({"role": "user", "content": text})
        pieces, last = [], None
        start = time.perf_counter()
        if cache is not None:  # a fresh compressed cache per turn: the prompt holds the history
            cache = build_cli_cache(args, model)
        for chunk in stream_reply(model, tokenizer, messages, max_tokens=args.max_tokens,
                                  temperature=args.temperature, prompt_cache=cache):
            print(chunk.text, end="", flush=True)
            pieces.append(chunk.text)
            last = chunk
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        if last is not None:
            memory = ""
            if cache is not None:
                m = cache_memory(cache, model)
                memory = (f", KV {format_bytes(m.nbytes)} vs fp16 {format_bytes(m.fp16_nbytes)}"
                          f" ({m.bits_per_element:.2f} bits/elem)")
            else:
                tokens = last.prompt_tokens + last.generation_tokens
                memory = f", KV fp16 {format_bytes(tokens * info.kv_bytes_per_token())}"
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s decode, "
                  f"{last.prompt_tps:.1f} tok/s prefill, {time.perf_counter() - start:.1f} s"
                  f"{memory}]", file=sys.stderr)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(p, width: int = 28) -> str:
    filled = int(width * p.samples_done / max(p.num_samples, 1))
    bar = "#" * filled + "." * (width - filled)
    return (f"[{bar}] {p.samples_done}/{p.num_samples} samples {p.tokens_done:,} tokens  "
            f"{p.tokens_per_s:,.0f} tok/s  ETA {format_duration(p.eta_s)}")


def distributed_group():
    """The mx.distributed group when launched with mlx.launch, else None."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def cmd_calibrate(args) -> int:
    import signal
    import threading

    from .bundle import save_rotations
    from .calibration import calibrate_spectral_rotation
    from .corpus import load_corpus
    from .models import load

    group = distributed_group()
    rank = group.rank() if group is not None else 0
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if rank == 0 else (lambda *a, **k: 0)
    model, tokenizer, info = load(args.model)
    corpus = load_corpus(args.corpus)
    where = f" on {group.size()} ranks" if group is not None else ""
    say(f"Calibrating {info.name} ({info.num_layers} layers × {info.num_kv_heads} KV heads × "
        f"{info.head_dim}) on {corpus.name}: {args.samples} × {args.seq_len} tokens, "
        f"keys {args.rope} RoPE{where}")
    cancel = threading.Event()

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        say("\ncancelling after the current sample (Ctrl-C again to abort now)…")

    previous = signal.signal(signal.SIGINT, on_sigint)
    interactive = sys.stderr.isatty()

    def progress(p):
        line = progress_line(p)
        if interactive:
            say("\r" + line, end="", flush=True)
        elif p.samples_done == p.num_samples or p.samples_done % max(1, p.num_samples // 10) == 0:
            say(line)

    try:
        rotations = calibrate_spectral_rotation(
            model, tokenizer, num_samples=args.samples, sequence_length=args.seq_len,
            corpus=corpus, rope=args.rope, seed=args.seed, progress=progress, cancel=cancel,
            group=group)
    finally:
        signal.signal(signal.SIGINT, previous)
        if interactive:
            say()
    if rank == 0:
        path = save_rotations(rotations, args.out)
        say(f"Wrote {path}")
    return 0


def cmd_sensitivity(args) -> int:
    from .bundle import load_cached_rotations
    from .models import load
    from .sensitivity import (
        allocate_layer_bits,
        run_sensitivity,
        save_sensitivity,
        sensitivity_tokens,
    )

    model, tokenizer, info = load(args.model)
    # A broken earlier measurement must not stop this one from replacing it.
    rotations = load_cached_rotations(args.bundle, model=model, layer_sensitivity=False)
    # Text the model writes itself by default: closer to other text than a reference
    # manual (BENCHMARKS.md: the allocation it gives does as well or better on held-out text).
    corpus, ids = sensitivity_tokens(model, tokenizer, args.corpus, args.tokens, args.seed)
    print(f"Measuring {info.name}'s {info.num_layers} layers one at a time on {len(ids)} "
          f"tokens of {corpus.name}", file=sys.stderr)
    interactive = sys.stderr.isatty()

    def progress(stage, done, total):
        line = f"[{done}/{total}] {stage}"
        if interactive:
            print("\r" + line.ljust(60), end="", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(line, file=sys.stderr)

    sensitivity = run_sensitivity(model, rotations, ids, progress=progress,
                                  chunk=min(512, len(ids) // 2),
                                  corpus_sha256=corpus.sha256)
    if interactive:
        print(file=sys.stderr)
    path = save_sensitivity(sensitivity, args.bundle)
    keys, values = sensitivity.keys, sensitivity.values
    print(f"{'layer':>5}  " + "  ".join(f"keys@{b:g}" for b in keys) + "  "
          + "  ".join(f"values@{b:g}" for b in values))
    for layer in range(sensitivity.num_layers):
        print(f"{layer:>5}  " + "  ".join(f"{keys[b][layer]:>7.5f}" for b in keys) + "  "
              + "  ".join(f"{values[b][layer]:>9.5f}" for b in values))
    plan = allocate_layer_bits(sensitivity, 3.0, 4)
    print(f"+la at keys 3 / values 4 bits: keys {plan['keys']}, values {plan['values']}; "
          f"modelled KL {plan['predicted_kl']:.4f} vs {plan['uniform_kl']:.4f} uniform")
    print(f"Wrote {path} (keys probed in the {sensitivity.key_basis} basis)", file=sys.stderr)
    return 0


def load_bundle_for_cli(directory):
    from .bundle import load_cached_rotations

    return load_cached_rotations(directory)


def cmd_inspect(args) -> int:
    import numpy as np

    from .spectral import compute_participation_ratio, compute_spectral_gap

    rotations = load_bundle_for_cli(args.bundle)
    print(f"{args.bundle}: {len(rotations)} layers × {rotations[0].num_kv_heads} KV heads × "
          f"head_dim {rotations[0].head_dim}, keys {rotations.rope_mode} RoPE, "
          f"{rotations.num_samples} × {rotations.sequence_length} tokens of "
          f"{rotations.corpus_name}")
    # Keys in the score-weighted basis the default configuration codes them in (+qm).
    scored = rotations.has_key_metric
    if scored:
        from .caches import key_metric_basis
    print(f"{'layer':>5}  {'key PR':>7}  {'value PR':>8}  "
          + (f"{'scored PR':>9}  " if scored else "")
          + f"{'key gap':>9}  {'value gap':>9}  top key eigenvalues (mean over heads)")
    for rot in rotations:
        key_pr = np.mean([compute_participation_ratio(v) for v in rot.key_eigenvalues])
        value_pr = np.mean([compute_participation_ratio(v) for v in rot.value_eigenvalues])
        scored_pr = ""
        if scored:
            pr = np.mean([compute_participation_ratio(v) for v in key_metric_basis(rot)[0]])
            scored_pr = f"{pr:>9.2f}  "
        key_gap = "/".join(str(compute_spectral_gap(v)) for v in rot.key_eigenvalues)
        value_gap = "/".join(str(compute_spectral_gap(v)) for v in rot.value_eigenvalues)
        top = ", ".join(f"{x:.3g}" for x in rot.key_eigenvalues.mean(axis=0)[: args.top])
        print(f"{rot.layer:>5}  {key_pr:>7.2f}  {value_pr:>8.2f}  {scored_pr}{key_gap:>9}  "
              f"{value_gap:>9}  {top}")
    if scored:
        print("scored PR: participation ratio of the keys whitened by the score-error metric "
              "(+qm, the default key basis)")
    return 0


def cmd_allocate(args) -> int:
    from collections import Counter

    from .spectral import allocate_bit_plan

    rotations = load_bundle_for_cli(args.bundle)
    plan = allocate_bit_plan(rotations, args.avg_bits, args.min, args.max, args.value_avg_bits)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plan, indent=2))
    print(f"Water-filled bits: keys {plan['key_avg_bits']} / values {plan['value_avg_bits']} "
          f"bits per dim on average, each dim in [{args.min}, {args.max}]")
    print(f"{'layer':>5}  {'part':<6}  {'predicted MSE':>13}  bits:dims per KV head")
    for entry in plan["layers"]:
        for part in ("keys", "values"):
            heads = ["  ".join(f"{b}:{n}" for b, n in sorted(Counter(h).items(), reverse=True))
                     for h in entry[part]]
            mse = sum(entry[f"{part}_distortion"]) / len(entry[part])
            print(f"{entry['layer']:>5}  {part:<6}  {mse:>13.4f}  " + "  |  ".join(heads))
    return 0


def cmd_eval(args) -> int:
    from .bundle import load_cached_rotations
    from .caches import parse_method
    from .evaluate import evaluate_methods, load_eval_text, results_table
    from .models import load

    model, tokenizer, info = load(args.model)
    rotations = None
    specs = [m for m in args.methods.split(",") if m]
    if any(m.startswith("spectral") for m in specs):
        if not args.bundle:
            raise VeloxError("spectral methods need --bundle DIR (run `velox calibrate`)")
        rotations = load_cached_rotations(args.bundle, model=model,
                                          allow_model_mismatch=args.allow_model_mismatch)
    configs = {spec: parse_method(spec, rotations, args.sink_tokens) for spec in specs}
    name, text, sha = load_eval_text(args.text)
    results = []
    for context in [int(c) for c in args.ctx.split(",")]:
        print(f"context {context}: {len(configs)} methods on {name} …", file=sys.stderr)
        results += evaluate_methods(model, tokenizer, configs, text, context, chunk=args.chunk,
                                    decode_tokens=args.decode_tokens)
    print(results_table(results))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({
            "model": info.name, "model_fingerprint": info.fingerprint(), "text": name,
            "text_sha256": sha, "bundle": args.bundle, "chunk": args.chunk,
            "date": time.strftime("%Y-%m-%d"), "results": [r.to_dict() for r in results]},
            indent=2))
    return 0


SWEEP_METHODS = ("fp16,affine2,affine3,affine4,affine8,rvq2,rvq3,rvq4,"
                 "spectral:wf1.5/a4g64,spectral:wf2/a4g64,spectral:wf2.5/a4g64,"
                 "spectral:wf3/a4g64,spectral:wf4/a4g64,spectral:wf2/a3g64,spectral:wf3/a3g64")


def cmd_bits_sweep(args) -> int:
    """Quality vs bits for every method family: JSON plus a PNG frontier plot."""
    import os
    import subprocess
    from pathlib import Path

    args.methods = args.methods or SWEEP_METHODS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.json = str(out / "sweep.json")
    code = cmd_eval(args)
    png = out / "frontier.png"
    # The plot is drawn by the studio's pyqtgraph in its own process: veloxcore never imports Qt.
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    done = subprocess.run([sys.executable, "-m", "studio.plots", "frontier", args.json,
                           str(png)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise VeloxError(f"{png}: plotting failed: {done.stderr.strip()[-500:]}")
    print(f"Wrote {args.json} and {png}", file=sys.stderr)
    return code


def add_cache_flags(p) -> None:
    p.add_argument("--bundle", help="rotation bundle (for spectral methods)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="use a bundle calibrated on other weights of the same shape")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velox", description=__doc__)
    parser.add_argument("--version", action="version", version=f"velox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model and print its card")
    p.add_argument("source", nargs="?", default="default",
                   help="'default', a GGUF file, a model directory or a cached HF repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("calibrate", help="calibrate spectral rotations and write a bundle")
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rope", choices=("pre", "post"), default="pre",
                   help="take keys before RoPE (better quality) or after it")
    p.add_argument("--corpus", default="bundled",
                   help="'bundled' or a .txt/.md/.jsonl file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("sensitivity",
                       help="measure each layer's cost of coded keys/values (for +la)")
    p.add_argument("--bundle", required=True, help="bundle directory (the file goes there)")
    p.add_argument("--model", default="default")
    p.add_argument("--corpus", default="generated",
                   help="'generated' (text the model writes from seed prompts), 'bundled' "
                        "(the calibration corpus) or a .txt/.md/.jsonl file")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("inspect", help="print a bundle's spectra per layer")
    p.add_argument("bundle")
    p.add_argument("--top", type=int, default=4, help="how many top eigenvalues to print")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("allocate", help="print the water-filled bit plan of a bundle")
    p.add_argument("bundle")
    p.add_argument("--avg-bits", type=float, default=3.0)
    p.add_argument("--value-avg-bits", type=float, default=None)
    p.add_argument("--min", type=int, default=1)
    p.add_argument("--max", type=int, default=8)
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("eval", help="teacher-forced quality of KV-cache methods vs fp16")
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default="fp16,affine4,rvq3,spectral:4/1/2",
                   help="comma-separated: fp16, affine4[gG], rvqB, spectral:S/N/V, "
                        "spectral:wfK/V, spectral:wfK/aV")
    p.add_argument("--ctx", default="2048", help="comma-separated context lengths")
    p.add_argument("--text", help="held-out text file (default: the bundled one)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per teacher-forced step")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="time this many greedy decode steps on the filled cache (0: skip)")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--json", help="write results here")
    add_cache_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bits-sweep", help="quality-vs-bits frontier of every method (JSON + PNG)")
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default=None, help=f"default: {SWEEP_METHODS}")
    p.add_argument("--ctx", default="2048")
    p.add_argument("--text", help="held-out text file (default: the bundled one)")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=0)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--out", required=True, help="folder for sweep.json and frontier.png")
    add_cache_flags(p)
    p.set_defaults(func=cmd_bits_sweep)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--model", default="default")
    p.add_argument("--method", default=None,
                   help="KV cache: fp16 (default), spectral, affine4, rvq3, spectral:wf3/3, …")
    p.add_argument("--signal-bits", type=int, default=None,
                   help="spectral keys above the spectral gap (default 4 when any bit flag "
                        "is given; with none, the measured best configuration is used)")
    p.add_argument("--noise-bits", type=int, default=None, help="keys below the gap (1)")
    p.add_argument("--value-bits", type=int, default=None, help="values (2)")
    p.add_argument("--avg-bits", type=float, default=None,
                   help="water-fill the keys at this average instead of signal/noise bits")
    add_cache_flags(p)
    p.add_argument("--prompt", help="answer one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CalibrationCancelled:
        print("velox: calibration cancelled; nothing was written", file=sys.stderr)
        return 130
    except VeloxError as e:
        print(f"velox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velox: cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `velox inspect DIR | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
