"""Chat generation through mlx-lm, with any prompt cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler


@dataclass
class ReplyChunk:
    text: str
    generation_tokens: int
    generation_tps: float
    prompt_tokens: int
    prompt_tps: float
    finish_reason: str | None


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template."""
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True)


def stream_reply(model, tokenizer, messages: list[dict], max_tokens: int = 256,
                 temperature: float = 0.0, prompt_cache=None) -> Iterator[ReplyChunk]:
    """Stream the assistant's reply to ``messages`` (greedy when temperature is 0)."""
    prompt = chat_prompt(tokenizer, messages)
    sampler = make_sampler(temp=temperature)
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                             sampler=sampler, prompt_cache=prompt_cache):
        yield ReplyChunk(r.text, r.generation_tokens, r.generation_tps,
                         r.prompt_tokens, r.prompt_tps, r.finish_reason)


def reply(model, tokenizer, messages: list[dict], **kwargs) -> str:
    return "".join(chunk.text for chunk in stream_reply(model, tokenizer, messages, **kwargs))
