"""Model loading: the default GGUF, tiny random models, and every kind of bad input."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from tinymodel import write_tiny_dir, write_tiny_gguf

import veloxcore
from veloxcore import ModelLoadError, models
from veloxcore.generate import reply


def logits(model, ids):
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


PROMPT = [5, 70, 80, 90, 100, 33, 44]


def test_default_model_answers_paris(default_model):
    model, tokenizer, info = default_model
    text = reply(model, tokenizer,
                 [{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in text


def test_default_model_info(default_model):
    _, _, info = default_model
    assert (info.architecture, info.num_layers, info.num_heads, info.num_kv_heads) == (
        "llama", 30, 9, 3)
    assert (info.head_dim, info.context_length, info.rope_traditional) == (64, 8192, True)
    assert info.rope_theta == 100000.0
    assert info.source_sha256 and len(info.source_sha256) == 64
    expected_dtype = "float32" if models.runs_on_cpu() else "float16"
    assert info.dtype == expected_dtype
    assert info.weight_bytes > 100e6


def test_tiny_directory_loads_and_matches_reference(tmp_path):
    reference = write_tiny_dir(tmp_path / "tiny")
    model, tokenizer, info = veloxcore.load(tmp_path / "tiny")
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (2, 2, 16)
    assert info.source_sha256 is None
    np.testing.assert_allclose(logits(model, PROMPT), logits(reference, PROMPT),
                               rtol=1e-4, atol=1e-4)


def test_tiny_gguf_converts_once_and_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    reference = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer, info = veloxcore.load(tmp_path / "tiny.gguf")
    np.testing.assert_allclose(logits(model, PROMPT), logits(reference, PROMPT),
                               rtol=1e-4, atol=1e-4)
    entry = tmp_path / "cache" / "models" / info.source_sha256
    assert (entry / models.CACHE_MARKER).is_file()
    # A second load reads the cache entry instead of converting again.
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    veloxcore.load(tmp_path / "tiny.gguf")
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    assert tokenizer.decode(tokenizer.encode("héllo 123")) == "héllo 123"


def expect_error(source, *fragments):
    with pytest.raises(ModelLoadError) as err:
        veloxcore.load(source)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def cache_entries(root):
    folder = root / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.gguf", str(tmp_path / "nope.gguf"), "no such file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "empty.gguf", "empty")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf_leaves_no_cache_entry(tmp_path, monkeypatch, keep):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    expect_error(tmp_path / "cut.gguf", "cut.gguf", "truncated")
    assert cache_entries(tmp_path / "cache") == []


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(200))
    expect_error(tmp_path / "bad.gguf", "bad.gguf", "corrupt")
    (tmp_path / "notgguf.bin").write_bytes(b"PK\x03\x04 this is a zip")
    expect_error(tmp_path / "notgguf.bin", "notgguf.bin", "not a GGUF file")
    assert cache_entries(tmp_path / "cache") == []


def test_unsupported_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "falcon.gguf", architecture="falcon")
    expect_error(tmp_path / "falcon.gguf", "falcon.gguf", "architecture 'falcon' is not supported")
    assert cache_entries(tmp_path / "cache") == []


def test_directory_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    expect_error(tmp_path / "weights", "weights", "no config.json")


def test_malformed_config(tmp_path):
    write_tiny_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    expect_error(tmp_path / "m", "config.json", "invalid JSON")


def test_safetensors_shapes_disagree_with_config(tmp_path):
    write_tiny_dir(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    message = expect_error(tmp_path / "m", "model.safetensors")
    assert "shape" in message.lower()


def test_uncached_hf_repo_id_is_refused_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error("someone/some-model", "someone/some-model", "local Hugging Face cache")


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-conversion

    monkeypatch.setattr("veloxcore.gguf.gguf_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        veloxcore.load(tmp_path / "tiny.gguf")
    assert cache_entries(tmp_path / "cache") == []
    monkeypatch.undo()
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))

    # A half-written entry (e.g. a process killed before the rename) has no
    # marker and is rebuilt rather than trusted.
    _, _, info = veloxcore.load(tmp_path / "tiny.gguf")
    entry = tmp_path / "cache" / "models" / info.source_sha256
    (entry / models.CACHE_MARKER).unlink()
    (entry / "model.safetensors").write_bytes(b"garbage")
    model, _, _ = veloxcore.load(tmp_path / "tiny.gguf")
    assert (entry / models.CACHE_MARKER).is_file()
    assert logits(model, PROMPT).shape == (len(PROMPT), 259)


def test_stale_temporaries_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "models" / ".tmp-dead-1"
    stale.mkdir(parents=True)
    old = 10_000
    os.utime(stale, (old, old))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    veloxcore.load(tmp_path / "tiny.gguf")
    assert not stale.exists()
    shutil.rmtree(tmp_path / "cache")


def test_random_header_corruption_never_crashes(tmp_path):
    """MLX's GGUF parser can segfault on corrupt headers; validation must catch
    every mutation first (or the file must still be valid)."""
    import random

    from veloxcore.gguf import read_gguf

    write_tiny_gguf(tmp_path / "ok.gguf")
    data = (tmp_path / "ok.gguf").read_bytes()
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(6000)] = rng.randrange(256)
        (tmp_path / "m.gguf").write_bytes(mutated)
        try:
            read_gguf(tmp_path / "m.gguf")
            outcomes["loaded"] += 1
        except ModelLoadError as e:
            assert "m.gguf" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50
