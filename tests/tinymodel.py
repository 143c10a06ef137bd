"""Tiny random llama models (directory and GGUF) for fast tests of the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from veloxcore.gguf import BLOCK_TENSOR_NAMES, TOP_TENSOR_NAMES

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_args(**overrides) -> llama.ModelArgs:
    values = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=len(SPECIALS) + 256, rope_theta=10000.0, rope_traditional=True,
                  max_position_embeddings=512, tie_word_embeddings=True, head_dim=16)
    values.update(overrides)
    return llama.ModelArgs(**values)


def tiny_model(seed: int = 0, **overrides) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(tiny_args(**overrides))
    mx.eval(model.parameters())
    return model


def tokens() -> list[str]:
    return SPECIALS + byte_tokens()


def write_tiny_dir(path: Path, seed: int = 0, **overrides) -> llama.Model:
    """An mlx-lm model directory: config.json, model.safetensors, tokenizer files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed, **overrides)
    args = model.args
    config = {k: getattr(args, k) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size", "rope_theta",
        "rope_traditional", "max_position_embeddings", "tie_word_embeddings", "head_dim")}
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    vocab = {t: i for i, t in enumerate(tokens())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return model


def write_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama") -> llama.Model:
    """A GGUF (F32 tensors) with llama metadata and a byte-level BPE vocabulary."""
    model = tiny_model(seed)
    args = model.args
    block = {v: k for k, v in BLOCK_TENSOR_NAMES.items()}
    top = {v: k for k, v in TOP_TENSOR_NAMES.items()}
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        base, _, suffix = name.rpartition(".")
        if base.startswith("model.layers."):
            _, _, layer, rest = base.split(".", 3)
            tensors[f"blk.{layer}.{block[rest]}.{suffix}"] = value
        else:
            tensors[f"{top[base]}.{suffix}"] = value
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    a = architecture
    metadata = {
        "general.architecture": a,
        "general.name": "tiny",
        f"{a}.embedding_length": u32(args.hidden_size),
        f"{a}.block_count": u32(args.num_hidden_layers),
        f"{a}.feed_forward_length": u32(args.intermediate_size),
        f"{a}.attention.head_count": u32(args.num_attention_heads),
        f"{a}.attention.head_count_kv": u32(args.num_key_value_heads),
        f"{a}.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        f"{a}.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32),
        f"{a}.context_length": u32(args.max_position_embeddings),
        f"{a}.attention.key_length": u32(args.head_dim),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens(),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": mx.array([3] * len(SPECIALS) + [1] * 256, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    mx.save_gguf(str(path), tensors, metadata)
    return model
