"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

MLX reads GGUF natively (``mx.load``): F32/F16 tensors load as they are and
Q4_0/Q4_1/Q8_0 load as MLX affine-quantized triples (weight, scales, biases,
group 32). What this module adds is the mapping to mlx-lm's llama module, a
``config.json`` and a Hugging Face tokenizer rebuilt from the GGUF metadata, so
that the result loads with plain ``mlx_lm.load``.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> mlx-lm llama parameter path.
BLOCK_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# GPT-2 style split used by llama.cpp for most byte-level BPE vocabularies.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer names -> (split digits individually first?, split regex)
PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT),
    "gpt2": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT),
    "starcoder": (True, GPT2_SPLIT),
    "refact": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT),
    "llama3": (False, LLAMA3_SPLIT),
}
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

Progress = Callable[[str, float], None]

# ggml tensor types MLX's GGUF loader supports: id -> (name, elements per block, bytes per block)
SUPPORTED_TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}
OTHER_TENSOR_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K",
                      13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                      18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                      23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                      29: "IQ1_M"}
# GGUF metadata value types -> struct format of a scalar (8: string, 9: array)
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                  11: "q", 12: "d"}
MAX_DIMS = 4


class _Cursor:
    """Bounds-checked little-endian reads over a GGUF file's bytes."""

    def __init__(self, path: Path, buffer) -> None:
        self.path, self.buf, self.pos = path, buffer, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(self.path, f"the GGUF header is truncated or corrupt "
                                            f"(needs {n} bytes at offset {self.pos})")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        raw = bytes(self.buf[self.take(n): self.pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(self.path, f"corrupt GGUF: a string at offset "
                                            f"{self.pos - n} is not UTF-8") from e

    def value(self, kind: int):
        if kind in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            elem, count = self.scalar("I"), self.scalar("Q")
            if elem in SCALAR_FORMATS:  # skip fixed-size arrays in one step
                self.take(count * struct.calcsize("<" + SCALAR_FORMATS[elem]))
                return None
            if elem not in (8, 9):
                raise ModelLoadError(self.path, f"corrupt GGUF: unknown array type {elem}")
            for _ in range(count):
                self.value(elem)
            return None
        raise ModelLoadError(self.path, f"corrupt GGUF: unknown metadata type {kind}")


def validate_gguf(path: Path) -> None:
    """Check a GGUF's whole structure before MLX parses it.

    MLX's loader can crash the process on a corrupt header, so every length,
    type and tensor extent is checked against the file size here first.
    """
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size == 0:
            raise ModelLoadError(path, "the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(path, buf)
            magic = bytes(buf[cur.take(4): 4])
            if magic != b"GGUF":
                raise ModelLoadError(path, f"not a GGUF file (starts with {magic!r}, "
                                           "expected b'GGUF')")
            version = cur.scalar("I")
            if version not in (2, 3):
                raise ModelLoadError(path, f"GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
            if n_tensors > size or n_kv > size:
                raise ModelLoadError(path, "the GGUF header is corrupt (impossible counts)")
            alignment = 32
            for _ in range(n_kv):
                key, kind = cur.string(), cur.scalar("I")
                value = cur.value(kind)
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            tensors = []
            for _ in range(n_tensors):
                name, n_dims = cur.string(), cur.scalar("I")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise ModelLoadError(path, f"corrupt GGUF: tensor {name!r} has {n_dims} dims")
                dims = [cur.scalar("Q") for _ in range(n_dims)]
                kind, offset = cur.scalar("I"), cur.scalar("Q")
                tensors.append((name, dims, kind, offset))
            data_start = -(-cur.pos // alignment) * alignment
    for name, dims, kind, offset in tensors:
        if kind not in SUPPORTED_TENSOR_TYPES:
            type_name = OTHER_TENSOR_TYPES.get(kind, f"unknown type {kind}")
            supported = ", ".join(n for n, _, _ in SUPPORTED_TENSOR_TYPES.values())
            raise ModelLoadError(path, f"tensor {name!r} is {type_name}, which is not supported "
                                       f"(supported: {supported})")
        _, block, block_bytes = SUPPORTED_TENSOR_TYPES[kind]
        count = 1
        for d in dims:
            count *= d
        if count % block:
            raise ModelLoadError(path, f"corrupt GGUF: tensor {name!r} size {count} is not a "
                                       f"multiple of its block size {block}")
        end = data_start + offset + count // block * block_bytes
        if end > size:
            raise ModelLoadError(path, f"tensor {name!r} extends past the end of the file "
                                       f"({end} > {size} bytes): truncated or corrupt")


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read tensors and metadata, turning MLX's loader errors into ModelLoadError."""
    validate_gguf(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        problem = str(e).replace("[load_gguf] ", "")
        if "gguf_init failed" in problem:
            problem = "the GGUF header is corrupt or truncated (gguf_init failed)"
        raise ModelLoadError(path, f"cannot read GGUF: {problem}") from e
    return weights, {k: _plain(v) for k, v in metadata.items()}


def _plain(value: Any) -> Any:
    """GGUF scalars arrive as 0-d mx.arrays; make them Python numbers."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def gguf_config(path: Path, metadata: dict[str, Any], weights: dict[str, mx.array]) -> dict:
    """An mlx-lm llama config.json dict from GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            path,
            f"GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    if "rope_freqs.weight" in weights:
        raise ModelLoadError(
            path, "per-frequency RoPE scaling (rope_freqs, Llama 3.1 style) is not supported"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(path, f"GGUF metadata lacks '{arch}.{key}'")
        return value

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        # GGUF stores q/k rows permuted for llama.cpp's interleaved RoPE.
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in weights,
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(meta("rope.scaling.factor")),
        }
    elif scaling not in (None, "none"):
        raise ModelLoadError(path, f"RoPE scaling type {scaling!r} is not supported")
    if any(k.endswith(".scales") for k in weights):
        # Per-layer bits/group are inferred by mlx-lm from the packed shapes.
        config["quantization"] = {"group_size": 32, "bits": 4}
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos)
    return config


def gguf_weights(path: Path, weights: dict[str, mx.array], num_layers: int) -> dict:
    """Rename GGUF tensors to mlx-lm llama parameter paths."""
    renamed = {}
    for name, array in weights.items():
        base, _, suffix = name.rpartition(".")  # suffix: weight | scales | biases | bias
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in BLOCK_TENSOR_NAMES:
            layer = int(parts[1])
            if layer >= num_layers:
                raise ModelLoadError(path, f"tensor {name!r} is for layer {layer} of {num_layers}")
            target = f"model.layers.{layer}.{BLOCK_TENSOR_NAMES[parts[2]]}"
        elif base in TOP_TENSOR_NAMES:
            target = TOP_TENSOR_NAMES[base]
        else:
            raise ModelLoadError(path, f"unexpected tensor {name!r} for a llama model")
        renamed[f"{target}.{suffix}"] = array
    return renamed


def gguf_tokenizer(path: Path, metadata: dict[str, Any]):
    """A transformers fast tokenizer (byte-level BPE) rebuilt from GGUF metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            path,
            f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')",
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(
            path,
            f"tokenizer pre-type {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})",
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    try:
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         fuse_unk=False, byte_fallback=False)
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelLoadError(path, f"invalid tokenizer metadata: {e}") from e
    tok = Tokenizer(bpe)
    split_digits, pattern = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and int(idx) < len(tokens) else None

    bos = token("bos")
    post = [processors.ByteLevel(trim_offsets=False)]
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        post.append(processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))]))
    tok.post_processor = processors.Sequence(post)
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types, strict=False)
               if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens(special)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        clean_up_tokenization_spaces=False,
    )
    template = metadata.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def convert_gguf(path: Path, out_dir: Path, progress: Progress | None = None) -> dict:
    """Write an mlx-lm model directory for ``path`` into ``out_dir``; return its config."""
    report = progress or (lambda stage, fraction: None)
    report("reading GGUF", 0.0)
    weights, metadata = read_gguf(path)
    config = gguf_config(path, metadata, weights)
    report("mapping tensors", 0.3)
    mapped = gguf_weights(path, weights, config["num_hidden_layers"])
    report("writing weights", 0.4)
    mx.save_safetensors(str(out_dir / "model.safetensors"), mapped, metadata={"format": "mlx"})
    report("building tokenizer", 0.8)
    gguf_tokenizer(path, metadata).save_pretrained(str(out_dir))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    report("converted", 1.0)
    return config
