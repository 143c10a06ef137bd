"""Rotation bundles: round trip, plain-safetensors readability, and every refusal."""

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_calibration import TEXT
from tinymodel import write_tiny_dir

import veloxcore
from veloxcore import (
    BundleError,
    calibrate_spectral_rotation,
    load_cached_rotations,
    save_rotations,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_dir(root / "model")
    model, tokenizer, info = veloxcore.load(root / "model")
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=3, sequence_length=64,
                                            corpus=TEXT, rope="pre")
    return model, rotations


def test_round_trip_and_plain_readability(tmp_path, tiny):
    model, rotations = tiny
    plan = veloxcore.allocate_bit_plan(rotations, 3.0)
    path = save_rotations(rotations, tmp_path / "b", bit_plan=plan)
    loaded = load_cached_rotations(path, model=model)
    assert loaded.rope_mode == "pre" and loaded.num_samples == 3
    assert loaded.corpus_sha256 == TEXT.sha256
    assert loaded.model_fingerprint == model.velox_info.fingerprint()
    for a, b in zip(rotations, loaded, strict=True):
        np.testing.assert_array_equal(a.key_eigenvectors, b.key_eigenvectors)
        np.testing.assert_array_equal(a.key_importance, b.key_importance)
        np.testing.assert_array_equal(a.value_eigenvalues, b.value_eigenvalues)
    # Someone without this project: json + safetensors only.
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = load_file(str(path / "rotations.safetensors"))
    assert tensors["layers.1.keys.eigenvectors"].shape == (2, 16, 16)
    assert manifest["calibration"]["rope_mode"] == "pre"
    assert json.loads((path / "bit_plan.json").read_text())["key_avg_bits"] == 3.0
    assert veloxcore.bundle.load_bit_plan(path) == plan


def test_existing_bundle_is_replaced_but_user_folders_are_not(tmp_path, tiny):
    _, rotations = tiny
    save_rotations(rotations, tmp_path / "b")
    save_rotations(rotations, tmp_path / "b")  # replace in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(BundleError, match="not a rotation bundle"):
        save_rotations(rotations, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_tampered_tensor_is_refused(tmp_path, tiny):
    _, rotations = tiny
    path = save_rotations(rotations, tmp_path / "b")
    data = bytearray((path / "rotations.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "rotations.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="rotations.safetensors: SHA-256 does not match"):
        load_cached_rotations(path)


def test_truncated_file_is_refused(tmp_path, tiny):
    _, rotations = tiny
    path = save_rotations(rotations, tmp_path / "b")
    data = (path / "rotations.safetensors").read_bytes()
    (path / "rotations.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or modified"):
        load_cached_rotations(path)


def test_wrong_model_bundle_is_refused_unless_overridden(tmp_path, tiny):
    model, rotations = tiny
    other = dataclasses.replace(rotations, model_fingerprint={
        **rotations.model_fingerprint, "weights_sha256": "0" * 64})
    path = save_rotations(other, tmp_path / "b")
    with pytest.raises(BundleError, match="calibrated for another model.*weights_sha256"):
        load_cached_rotations(path, model=model)
    assert len(load_cached_rotations(path, model=model, allow_model_mismatch=True)) == 2


def test_other_head_counts_are_refused_even_with_override(tmp_path, tiny):
    model, rotations = tiny
    path = save_rotations(dataclasses.replace(rotations, layers=rotations.layers[:1]),
                          tmp_path / "b")
    with pytest.raises(BundleError, match="1 layers .* the model has 2"):
        load_cached_rotations(path, model=model, allow_model_mismatch=True)


@pytest.mark.parametrize("corruption, message", [
    (lambda m: "{not json", "malformed JSON"),
    (lambda m: json.dumps({**m, "format": "something-else"}), "not a velox.spectral-rotations"),
    (lambda m: json.dumps({**m, "format_version": 99}), "format_version 99"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "calibration"}), "'calibration'"),
    (lambda m: json.dumps({**m, "files": {}}), "does not list rotations.safetensors"),
    (lambda m: json.dumps({**m, "head_dim": 32}), "expected (2, 32) float32"),
])
def test_malformed_manifest_is_refused(tmp_path, tiny, corruption, message):
    _, rotations = tiny
    path = save_rotations(rotations, tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(corruption(manifest))
    with pytest.raises(BundleError) as err:
        load_cached_rotations(path)
    assert "b" in str(err.value) and message in str(err.value)


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        load_cached_rotations(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_cached_rotations(tmp_path / "empty")
