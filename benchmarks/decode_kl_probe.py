"""Decode-mode quality: fp16's greedy reply fed back one token at a time.

    python benchmarks/decode_kl_probe.py "METHOD,METHOD,..." [--max-tokens 48]

Teacher-forced evaluation (``velox eval``) feeds text in chunks, so every token there is
coded with its chunk. Chat decodes one token per step, which is where batched appends
(decoded tokens wait at fp16 until 16 have gathered) and the last prompt token (mlx-lm
feeds it alone) differ. For each of the seed prompts plus two short questions this
takes fp16's greedy reply, runs prompt + reply through each method's cache the way
mlx-lm decodes (prompt body at once, then one token per call) and reports the mean
KL(fp16 ‖ method) of the next-token distributions over the reply.
"""

from __future__ import annotations

import argparse

import numpy as np

from veloxcore import load, load_cached_rotations
from veloxcore.caches import KVCacheBuilder, parse_method
from veloxcore.corpus import DEFAULT_SEED_PROMPTS
from veloxcore.generate import chat_prompt, reply

mx = __import__("mlx.core").core  # after veloxcore (OpenBLAS preload on Linux)
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

BUNDLE = "assets/bundles/smollm2-135m-instruct-pre"
PROMPTS = (*DEFAULT_SEED_PROMPTS, "What is the capital of France?",
           "Name three primary colours.")


def next_token_probs(model, caches, ids: list[int], fed_alone: int) -> np.ndarray:
    """Probabilities after each of the last ``fed_alone`` tokens, fed one per call."""
    model(mx.array(ids[:-fed_alone])[None], cache=caches)
    out = [model(mx.array([t])[None], cache=caches)[0, -1] for t in ids[-fed_alone:]]
    return np.array(mx.softmax(mx.stack(out).astype(mx.float32), axis=-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--bundle", default=BUNDLE)
    args = ap.parse_args()
    model, tokenizer, _ = load("default", dequantize=True)
    rotations = load_cached_rotations(args.bundle, model=model)
    eos = next(iter(tokenizer.eos_token_ids))
    n = args.max_tokens
    sequences = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        answer = tokenizer.encode(reply(model, tokenizer, messages, max_tokens=n))
        # The last prompt token and the reply (padded with EOS), one per call.
        sequences.append(chat_prompt(tokenizer, messages) + (answer + [eos] * n)[:n])
    references = [next_token_probs(model, make_prompt_cache(model), s, n + 1)
                  for s in sequences]
    for method in args.methods.split(","):
        kls = []
        for ids, ref in zip(sequences, references, strict=True):
            caches = KVCacheBuilder.build(model, parse_method(method, rotations))
            got = next_token_probs(model, caches, ids, n + 1)
            kls.append(float(np.mean(np.sum(ref * (np.log(ref + 1e-12)
                                                   - np.log(got + 1e-12)), axis=-1))))
        print(f"{method}: decode-mode KL per prompt {np.round(kls, 4).tolist()} "
              f"mean {np.mean(kls):.4f}", flush=True)


if __name__ == "__main__":
    main()
