"""The tokenizer and chat template rebuilt from the default model's GGUF metadata."""

import mlx.core as mx
import pytest

from veloxcore import models

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # ok",
    "Größe, naïve café — 日本語のテキスト, emoji 🚀🎉, Ελληνικά, Русский текст.",
    "   leading and trailing spaces   \n\n",
]


@pytest.fixture(scope="module")
def gguf_metadata():
    _, metadata = mx.load(str(models.default_model_path()), return_metadata=True)
    return metadata


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(default_model, text):
    _, tokenizer, _ = default_model
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_digits_are_split_individually(default_model):
    # llama.cpp's 'smollm' pre-tokenizer splits numbers into single digits.
    _, tokenizer, _ = default_model
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_token_ids_match_metadata(default_model, gguf_metadata):
    _, tokenizer, _ = default_model
    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    eos = gguf_metadata["tokenizer.ggml.eos_token_id"].item()
    bos = gguf_metadata["tokenizer.ggml.bos_token_id"].item()
    assert tokenizer.eos_token_id == eos
    assert tokenizer.bos_token_id == bos
    assert tokenizer.convert_tokens_to_ids(tokens[eos]) == eos
    for i, kind in enumerate(gguf_metadata["tokenizer.ggml.token_type"].tolist()):
        if kind == 3:  # control tokens encode to exactly their id
            assert tokenizer.encode(tokens[i]) == [i]
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.encode("user")[0]]


def test_chat_template_renders_two_turns(default_model):
    _, tokenizer, _ = default_model
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"
        "\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    )
