"""Rotation bundles: safetensors tensors + a JSON manifest, written atomically.

A bundle is a directory (format: docs/bundle-format.md)::

    manifest.json           format, model fingerprint, calibration record, file hashes
    rotations.safetensors   layers.{i}.{keys,values}.{eigenvalues,eigenvectors,mean} (float32)
    bit_plan.json           optional: the chosen bit allocation

It loads with plain ``safetensors`` + ``json``; no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from . import __version__
from .calibration import SpectralRotation, SpectralRotations
from .errors import VeloxError

FORMAT = "velox.spectral-rotations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "rotations.safetensors"
BIT_PLAN = "bit_plan.json"
FINGERPRINT_KEYS = ("architecture", "config_sha256", "weights_sha256")
SHAPE_KEYS = ("num_layers", "num_kv_heads", "head_dim")


class BundleError(VeloxError):
    """A bundle is missing, malformed, tampered with, or for another model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _tensor_name(layer: int, part: str, what: str) -> str:
    return f"layers.{layer}.{part}.{what}"


def save_rotations(rotations: SpectralRotations, directory: str | Path,
                   bit_plan: dict | None = None) -> Path:
    """Write a bundle to ``directory`` atomically (temporary folder, then rename).

    An existing bundle at ``directory`` is replaced; an existing folder that is
    not a bundle (and not empty) is refused, so user files are never deleted.
    """
    target = Path(directory).expanduser().resolve()
    if target.exists() and not _replaceable(target):
        raise BundleError(f"{target}: exists and is not a rotation bundle; choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {}
        for rot in rotations:
            for part, vals, vecs, mean in (
                    ("keys", rot.key_eigenvalues, rot.key_eigenvectors, rot.key_mean),
                    ("values", rot.value_eigenvalues, rot.value_eigenvectors, rot.value_mean)):
                for what, array in (("eigenvalues", vals), ("eigenvectors", vecs),
                                    ("mean", mean)):
                    tensors[_tensor_name(rot.layer, part, what)] = np.ascontiguousarray(
                        array, dtype=np.float32)
            if rot.key_importance is not None:
                tensors[_tensor_name(rot.layer, "keys", "importance")] = np.ascontiguousarray(
                    rot.key_importance, dtype=np.float32)
            if rot.key_metric is not None:
                tensors[_tensor_name(rot.layer, "keys", "metric")] = np.ascontiguousarray(
                    rot.key_metric, dtype=np.float32)
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        files = [TENSORS]
        if bit_plan is not None:
            (tmp / BIT_PLAN).write_text(json.dumps(bit_plan, indent=2))
            files.append(BIT_PLAN)
        first = rotations[0]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool": "velox-studio",
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": dict(rotations.model_fingerprint),
            "num_layers": len(rotations),
            "num_kv_heads": first.num_kv_heads,
            "head_dim": first.head_dim,
            "calibration": {
                "rope_mode": rotations.rope_mode,
                "num_samples": rotations.num_samples,
                "sequence_length": rotations.sequence_length,
                "sink_tokens": rotations.sink_tokens,
                "token_count": rotations.token_count,
                "seed": rotations.seed,
                "corpus": rotations.corpus_name,
                "corpus_sha256": rotations.corpus_sha256,
            },
            "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if rotations.layer_sensitivity is not None:  # a side file, re-measurable later
            from .sensitivity import save_sensitivity

            save_sensitivity(rotations.layer_sensitivity, tmp)  # readable, as below
        umask = os.umask(0)
        os.umask(umask)
        for name in [*files, MANIFEST]:  # safetensors writes 0600; bundles are for sharing
            os.chmod(tmp / name, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replaceable(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict:
    """The manifest, with its schema checked."""
    path = Path(directory).expanduser() / MANIFEST
    if not Path(directory).expanduser().is_dir():
        raise BundleError(f"{Path(directory)}: no such bundle directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{path}: missing (not a rotation bundle)") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                          f"supported (expected {FORMAT_VERSION})")
    required = {"model": dict, "calibration": dict, "files": dict, "num_layers": int,
                "num_kv_heads": int, "head_dim": int}
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if TENSORS not in manifest["files"]:
        raise BundleError(f"{path}: 'files' does not list {TENSORS}")
    if manifest["calibration"].get("rope_mode") not in ("pre", "post"):
        raise BundleError(f"{path}: calibration.rope_mode must be 'pre' or 'post'")
    return manifest


def _optional_tensor(root: Path, tensors: dict, name: str, shape: tuple) -> np.ndarray | None:
    """A tensor of the bundle, checked for shape, dtype and finite values: None if absent."""
    array = tensors.get(name)
    if array is None:
        return None
    if array.shape != shape or array.dtype != np.float32:
        raise BundleError(f"{root / TENSORS}: tensor {name!r} has shape {array.shape} "
                          f"{array.dtype}, expected {shape} float32")
    if not np.all(np.isfinite(array)):
        raise BundleError(f"{root / TENSORS}: tensor {name!r} has NaN/inf values")
    return array


def load_cached_rotations(directory: str | Path, model=None,
                          allow_model_mismatch: bool = False,
                          layer_sensitivity: bool = True) -> SpectralRotations:
    """Load and verify a bundle: schema, file hashes, tensor shapes and, when a
    model is given, its fingerprint. ``allow_model_mismatch`` overrides a
    fingerprint mismatch (same shapes, other weights) — never a hash failure.
    ``layer_sensitivity=False`` skips the optional layer_sensitivity.json."""
    root = Path(directory).expanduser()
    manifest = read_manifest(root)
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise BundleError(f"{root / MANIFEST}: files[{name!r}] has no sha256")
        if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            raise BundleError(f"{path}: {path.stat().st_size} bytes, manifest says "
                              f"{entry['bytes']} (truncated or modified)")
        if _sha256(path) != entry["sha256"]:
            raise BundleError(f"{path}: SHA-256 does not match the manifest (tampered or corrupt)")
    try:
        tensors = load_file(str(root / TENSORS))
    except Exception as e:  # safetensors raises its own error types
        raise BundleError(f"{root / TENSORS}: unreadable safetensors ({e})") from e

    layers_n, heads, dim = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    calib = manifest["calibration"]
    layers = []
    for layer in range(layers_n):
        parts = {}
        for part in ("keys", "values"):
            for what, shape in (("eigenvalues", (heads, dim)), ("eigenvectors", (heads, dim, dim)),
                                ("mean", (heads, dim))):
                name = _tensor_name(layer, part, what)
                array = _optional_tensor(root, tensors, name, shape)
                if array is None:
                    raise BundleError(f"{root / TENSORS}: tensor {name!r} is missing")
                parts[(part, what)] = array
        importance = _optional_tensor(root, tensors, _tensor_name(layer, "keys", "importance"),
                                      (heads, dim))
        metric = _optional_tensor(root, tensors, _tensor_name(layer, "keys", "metric"),
                                  (heads, dim, dim))
        if metric is not None and calib["rope_mode"] != "pre":
            raise BundleError(f"{root / TENSORS}: tensor "
                              f"{_tensor_name(layer, 'keys', 'metric')!r} belongs to pre-RoPE "
                              f"keys, but this bundle's keys are {calib['rope_mode']}-RoPE")
        layers.append(SpectralRotation(
            layer, dim, calib["rope_mode"], int(calib.get("token_count", 0)),
            parts[("keys", "eigenvalues")], parts[("keys", "eigenvectors")],
            parts[("values", "eigenvalues")], parts[("values", "eigenvectors")],
            key_mean=parts[("keys", "mean")], value_mean=parts[("values", "mean")],
            key_importance=importance, key_metric=metric))
    rotations = SpectralRotations(
        layers=layers, rope_mode=calib["rope_mode"],
        num_samples=int(calib.get("num_samples", 0)),
        sequence_length=int(calib.get("sequence_length", 0)),
        corpus_name=str(calib.get("corpus", "")), corpus_sha256=str(calib.get("corpus_sha256", "")),
        seed=int(calib.get("seed", 0)), sink_tokens=int(calib.get("sink_tokens", 0)),
        model_fingerprint=dict(manifest["model"]))
    if model is not None:
        check_model(rotations, model, root, allow_model_mismatch)
    from .sensitivity import SENSITIVITY_FILE, load_sensitivity

    sensitivity = load_sensitivity(root) if layer_sensitivity else None
    if sensitivity is not None and sensitivity.num_layers != layers_n:
        raise BundleError(f"{root / SENSITIVITY_FILE}: costs for "
                          f"{sensitivity.num_layers} layers, the bundle has {layers_n}")
    rotations.layer_sensitivity = sensitivity
    return rotations


def load_bit_plan(directory: str | Path) -> dict | None:
    path = Path(directory).expanduser() / BIT_PLAN
    return json.loads(path.read_text()) if path.is_file() else None


def check_model(rotations: SpectralRotations, model, where: Path | str = "bundle",
                allow_model_mismatch: bool = False) -> None:
    """Refuse rotations whose shapes or fingerprint do not match ``model``."""
    from .calibration import model_shape

    layers_n, heads, dim = model_shape(model)
    first = rotations[0]
    got = (len(rotations), first.num_kv_heads, first.head_dim)
    if got != (layers_n, heads, dim):
        raise BundleError(f"{where}: rotations are for {got[0]} layers × {got[1]} KV heads × "
                          f"head_dim {got[2]}, the model has {layers_n} × {heads} × {dim}")
    info = getattr(model, "velox_info", None)
    if info is None or allow_model_mismatch:
        return
    want = info.fingerprint()
    have = rotations.model_fingerprint
    diffs = [k for k in FINGERPRINT_KEYS if have.get(k) != want.get(k)]
    if diffs:
        raise BundleError(f"{where}: calibrated for another model ({', '.join(diffs)} differ: "
                          f"bundle {have.get('architecture')} vs loaded {want.get('architecture')})"
                          "; pass allow_model_mismatch=True (--allow-model-mismatch) to use it "
                          "anyway")
