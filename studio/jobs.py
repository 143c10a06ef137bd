"""Job bodies run by the engine's worker thread (the only studio module using veloxcore).

Each job takes ``(state, job, **params)``, reports progress with ``yield`` or
``job.emit`` and returns plain Python data for the views.
"""

from __future__ import annotations

import veloxcore
from veloxcore.generate import stream_reply


def load_model(state, job, source: str):
    def progress(stage: str, fraction: float) -> None:
        job.emit({"stage": stage, "fraction": fraction})

    model, tokenizer, info = veloxcore.load(source, progress=progress)
    job.check()
    state.model, state.tokenizer, state.info = model, tokenizer, info
    return info.to_dict()


def generate(state, job, messages: list[dict], max_tokens: int = 256):
    if state.model is None:
        raise veloxcore.VeloxError("no model is loaded; load one in the Model view first")
    text = []
    last = None
    for chunk in stream_reply(state.model, state.tokenizer, messages, max_tokens=max_tokens):
        job.check()
        text.append(chunk.text)
        last = chunk
        yield {"text": chunk.text}
    return {
        "text": "".join(text),
        "tokens": last.generation_tokens if last else 0,
        "tokens_per_s": last.generation_tps if last else 0.0,
    }
