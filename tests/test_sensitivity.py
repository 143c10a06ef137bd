"""Layer sensitivity (velox sensitivity) and one bit budget over layers (+la)."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from test_calibration import TEXT
from tinymodel import write_tiny_dir

import veloxcore
from veloxcore import calibrate_spectral_rotation, load_cached_rotations, save_rotations
from veloxcore.caches import CacheConfigError, KVCacheBuilder, cache_memory, parse_method
from veloxcore.evaluate import _log_probs
from veloxcore.sensitivity import (
    SENSITIVITY_FILE,
    LayerSensitivity,
    SensitivityError,
    allocate_layer_bits,
    layer_cost,
    load_sensitivity,
    probe_specs,
    run_sensitivity,
    save_sensitivity,
)


def synthetic(layers=4, seed=0):
    rng = np.random.default_rng(seed)
    k3 = rng.uniform(1e-4, 5e-3, layers)
    v4 = rng.uniform(1e-4, 3e-3, layers)
    return LayerSensitivity(keys={2.0: k3 * rng.uniform(2, 5, layers), 3.0: k3},
                            values={3: v4 * rng.uniform(2.5, 4.5, layers), 4: v4}, tokens=64)


def test_layer_cost_passes_through_the_probes_and_falls_with_bits():
    s = synthetic()
    np.testing.assert_allclose(layer_cost(s.keys, 2.0), s.keys[2.0])
    np.testing.assert_allclose(layer_cost(s.keys, 3.0), s.keys[3.0])
    between = layer_cost(s.keys, 2.5)
    np.testing.assert_allclose(between, np.sqrt(s.keys[2.0] * s.keys[3.0]))  # log-linear
    widths = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    costs = np.stack([layer_cost(s.keys, b) for b in widths])
    assert np.all(np.diff(costs, axis=0) < 0)


def test_allocation_is_the_exact_optimum_within_the_budget():
    s = synthetic(layers=4, seed=3)
    plan = allocate_layer_bits(s, 3.0, 4)
    keys = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    values = [3, 4, 5]
    best = None
    for picks in itertools.product(itertools.product(keys, values), repeat=4):
        if sum(k + v for k, v in picks) > 4 * 7.0 + 1e-9:
            continue
        cost = sum(layer_cost(s.keys, k)[i] + layer_cost(s.values, v)[i]
                   for i, (k, v) in enumerate(picks))
        if best is None or cost < best[0]:
            best = (cost, picks)
    assert plan["predicted_kl"] == pytest.approx(best[0], rel=1e-9)
    assert sum(plan["keys"]) + sum(plan["values"]) <= 28.0 + 1e-9
    assert plan["predicted_kl"] <= plan["uniform_kl"]


@pytest.mark.parametrize("key_bits", [3.2, 3.25, 2.75])
def test_targets_between_half_bits_are_met_by_whole_half_bits(key_bits):
    """Key codes pad to whole words (half bits at head_dim 64): every layer gets a width
    on the half-bit grid, and the average meets a target between them (a width of 2.75
    in every layer would cost 3 bits each)."""
    s = synthetic(layers=30, seed=7)
    plan = allocate_layer_bits(s, key_bits, 4)
    assert sum(plan["keys"]) + sum(plan["values"]) <= 30 * (key_bits + 4) + 1e-6
    assert all((2 * k).is_integer() for k in plan["keys"])
    assert sum(plan["keys"]) + sum(plan["values"]) > 30 * (key_bits + 4) - 0.5 - 1e-6
    assert plan["predicted_kl"] <= plan["uniform_kl"]


def test_equal_layers_keep_the_uniform_widths():
    same = np.full(5, 2e-3)
    s = LayerSensitivity({2.0: same * 3, 3.0: same}, {3: same * 3, 4: same}, tokens=1)
    plan = allocate_layer_bits(s, 3.0, 4)
    assert plan["keys"] == [3.0] * 5 and plan["values"] == [4] * 5
    assert plan["predicted_kl"] == pytest.approx(plan["uniform_kl"])


def test_file_round_trip_and_clear_errors(tmp_path):
    s = synthetic()
    save_sensitivity(s, tmp_path)
    loaded = load_sensitivity(tmp_path)
    for part in ("keys", "values"):
        for b, v in getattr(s, part).items():
            np.testing.assert_array_equal(getattr(loaded, part)[b], v)
    assert load_sensitivity(tmp_path / "nowhere") is None
    path = tmp_path / SENSITIVITY_FILE
    path.write_text("{not json")
    with pytest.raises(SensitivityError, match=f"{SENSITIVITY_FILE}: unreadable JSON"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["keys"]["2.0"] = data["keys"]["2.0"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="one cost per layer"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["values"]["3"][0] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="finite and >= 0"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["keys"] = {"2": data["keys"]["2.0"], "2.0": data["keys"]["3.0"]}  # one width twice
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="two or more distinct"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["values"]["nan"] = data["values"].pop("3")
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="two or more distinct"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["tokens"] = "many"
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="'tokens'"):
        load_sensitivity(tmp_path)
    data = s.to_json()
    data["key_basis"] = "pca"
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match="'key_basis' must be one of 'qm', 'qa', "
                                               "'eigen', not 'pca'"):
        load_sensitivity(tmp_path)
    del data["key_basis"]  # files from before it was recorded
    path.write_text(json.dumps(data))
    assert load_sensitivity(tmp_path).key_basis == ""
    with pytest.raises(SensitivityError, match="no such bundle directory"):
        save_sensitivity(s, tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sensitivity")
    write_tiny_dir(root / "model", head_dim=64, num_hidden_layers=3)
    model, tokenizer, _ = veloxcore.load(root / "model")
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=4, sequence_length=96,
                                            corpus=TEXT, rope="pre")
    bundle = save_rotations(rotations, root / "bundle")
    ids = tokenizer.encode(TEXT.text)[:128]
    return model, tokenizer, bundle, ids


def test_measured_costs_are_single_layer_kl_on_the_text(tiny):
    model, _, bundle, ids = tiny
    rotations = load_cached_rotations(bundle, model=model)
    assert rotations.layer_sensitivity is None
    stages = []
    s = run_sensitivity(model, rotations, ids, chunk=64,
                        progress=lambda *a: stages.append(a))
    assert [d for _, d, _ in stages] == list(range(1, 3 * 4 + 1))
    assert s.num_layers == 3 and s.tokens == 128 and s.key_basis == "qm"
    # Recompute one entry independently: values at 3 bits in layer 1 only.
    spec = probe_specs(rotations.has_key_importance, 64, rotations.has_key_metric)["values"][3]
    assert "+qm" in spec  # calibrated with the query metric: the default key basis
    caches = [KVCache() for _ in range(3)]
    caches[1] = KVCacheBuilder.build(model, parse_method(spec, rotations))[1]
    x = mx.array(ids)[None]
    fp = [KVCache() for _ in range(3)]
    ref = mx.concatenate([_log_probs(model(x[:, i: i + 64], cache=fp)[0]) for i in (0, 64)])
    got = mx.concatenate([_log_probs(model(x[:, i: i + 64], cache=caches)[0]) for i in (0, 64)])
    kl = (mx.exp(ref) * (ref - got)).sum(-1).mean().item()
    assert s.values[3][1] == pytest.approx(max(kl, 0.0), rel=1e-4, abs=1e-7)
    assert np.all(s.keys[2.0] >= 0) and np.all(np.isfinite(s.values[4]))


def test_layer_allocation_builds_per_layer_widths_within_the_budget(tiny, tmp_path):
    model, _, bundle, _ = tiny
    rotations = load_cached_rotations(bundle, model=model)
    with pytest.raises(CacheConfigError, match="velox sensitivity"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+la", rotations))
    # Layer 0 costs far more than the others: it should get more bits.
    costs = np.array([5e-2, 1e-3, 1e-3])
    save_sensitivity(LayerSensitivity({2.0: costs * 3, 3.0: costs}, {3: costs * 3, 4: costs},
                                      tokens=1), bundle)
    rotations = load_cached_rotations(bundle, model=model)
    uniform = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+vh", rotations))
    allocated = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+vh+la", rotations))
    layers = allocated.layer_allocation
    assert layers[0]["keys"] > 3.0 and layers[0]["values"] >= 4
    assert sum(x["keys"] + x["values"] for x in layers) <= 3 * 7.0
    assert [c.value_affine[0] for c in allocated] == [x["values"] for x in layers]
    ids = mx.array(list(range(10, 200)))[None]
    for caches in (uniform, allocated):
        model(ids, cache=caches)
    # Same budget: the real footprint is within one word per token of the uniform one.
    assert cache_memory(allocated, model).nbytes <= cache_memory(uniform, model).nbytes * 1.05
    with pytest.raises(CacheConfigError, match="value widths per layer"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/3+la", rotations))
    # Costs measured in one key basis and used by a configuration coding in another: noted.
    assert allocated.notes == []  # costs without a recorded basis (older files)
    save_sensitivity(LayerSensitivity({2.0: costs * 3, 3.0: costs}, {3: costs * 3, 4: costs},
                                      tokens=1, key_basis="qa"), bundle)
    rotations = load_cached_rotations(bundle, model=model)
    same = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+qa+la", rotations))
    other = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+la", rotations))
    assert same.notes == [] and uniform.notes == []
    assert len(other.notes) == 1 and "'qa' basis" in other.notes[0]
    assert "'eigen'" in other.notes[0]
    (bundle / SENSITIVITY_FILE).unlink()


def test_cli_writes_the_file_that_plus_la_uses(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    write_tiny_dir(tmp_path / "tiny", head_dim=64)
    (tmp_path / "corpus.txt").write_text(TEXT.text)
    common = ["--model", str(tmp_path / "tiny"), "--corpus", str(tmp_path / "corpus.txt")]
    run = subprocess.run([str(bin_dir / "velox"), "calibrate", *common, "--samples", "4",
                          "--seq-len", "64", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([str(bin_dir / "velox"), "sensitivity", *common, "--bundle",
                          str(tmp_path / "b"), "--tokens", "128"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "+la at keys 3 / values 4 bits" in run.stdout
    model, _, _ = veloxcore.load(tmp_path / "tiny")
    rotations = load_cached_rotations(tmp_path / "b", model=model)
    assert rotations.layer_sensitivity.tokens == 128
    caches = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+la", rotations))
    assert len(caches.layer_allocation) == len(model.layers)
    # Default text: what the model writes from the seed prompts.
    run = subprocess.run([str(bin_dir / "velox"), "sensitivity", "--model",
                          str(tmp_path / "tiny"), "--bundle", str(tmp_path / "b"),
                          "--tokens", "128"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "generated by the model" in run.stderr
    assert load_sensitivity(tmp_path / "b").corpus_sha256 != TEXT.sha256
    bad = subprocess.run([str(bin_dir / "velox"), "sensitivity", *common, "--bundle",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nope" in bad.stderr


def test_bundles_carry_their_sensitivity_through_export(tiny, tmp_path):
    model, _, bundle, _ = tiny
    rotations = load_cached_rotations(bundle, model=model)
    rotations.layer_sensitivity = synthetic(layers=3)
    path = save_rotations(rotations, tmp_path / "exported")
    again = load_cached_rotations(path, model=model)
    np.testing.assert_array_equal(again.layer_sensitivity.keys[2.0],
                                  rotations.layer_sensitivity.keys[2.0])
    assert not [p for p in path.iterdir() if p.name.startswith(".sensitivity")]
    # Re-measuring replaces the side file without breaking the manifest's hashes.
    save_sensitivity(synthetic(layers=3, seed=5), path)
    assert load_cached_rotations(path, model=model).layer_sensitivity is not None
    # A sensitivity for another layer count is refused, naming the file.
    save_sensitivity(synthetic(layers=4), path)
    with pytest.raises(veloxcore.BundleError, match=SENSITIVITY_FILE):
        load_cached_rotations(path, model=model)
    # ... but a new measurement can still load the rotations to replace it.
    plain = load_cached_rotations(path, model=model, layer_sensitivity=False)
    assert plain.layer_sensitivity is None and len(plain) == 3
