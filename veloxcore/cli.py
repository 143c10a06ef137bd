"""The ``velox`` command line: everything the studio does, scriptable."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__
from .errors import VeloxError


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


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


def cmd_chat(args) -> int:
    from .generate import stream_reply
    from .models import load

    model, tokenizer, info = load(args.model)
    print(f"{info.name}: {info.num_layers} layers, {info.dtype}. Empty line or Ctrl-D quits.",
          file=sys.stderr)
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
        for chunk in stream_reply(model, tokenizer, messages, max_tokens=args.max_tokens,
                                  temperature=args.temperature):
            print(chunk.text, end="", flush=True)
            pieces.append(chunk.text)
            last = chunk
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        if last is not None:
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s decode, "
                  f"{last.prompt_tps:.1f} tok/s prefill, {time.perf_counter() - start:.1f} s]",
                  file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velox", description=__doc__)
    parser.add_argument("--version", action="version", version=f"velox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model and print its card")
    p.add_argument("source", nargs="?", default="default",
                   help="'default', a GGUF file, a model directory or a cached HF repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--model", default="default")
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
    except VeloxError as e:
        print(f"velox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velox: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
