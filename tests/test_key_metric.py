"""Metric-weighted key bases (+qm): the position-averaged query metric, the whitened
basis, calibration, bundles and the cache that codes in it."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_calibration import TEXT
from tinymodel import SPECIALS, write_tiny_dir

import veloxcore
from veloxcore import BundleError, calibrate_spectral_rotation, load_cached_rotations
from veloxcore.bundle import save_rotations
from veloxcore.caches import CacheConfigError, KVCacheBuilder, parse_method
from veloxcore.key_metric import metric_basis, position_averaged_metric, rope_pairs


def brute_force_metric(rope, moments, span, harmonic):
    """Σ_d w(d)·A·R(d)·A·M·A·R(d)ᵀ·A / Σ_d w(d): RoPE at the query's position (read off
    the module, amplitude A included) against RoPE at the key's (position 0: A alone)."""
    D = moments.shape[-1]
    eye = mx.eye(D, dtype=mx.float32).reshape(1, D, 1, D)
    at0 = np.array(rope(eye, offset=0).reshape(D, D), dtype=np.float64).T  # A
    total, weights = np.zeros((D, D)), 0.0
    for d in range(span):
        turn = np.array(rope(eye, offset=d).reshape(D, D), dtype=np.float64).T  # A·R(d)
        w = 1.0 / (d + 1) if harmonic else 1.0
        total += w * at0.T @ turn @ moments @ turn.T @ at0
        weights += w
    return total / weights


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims", [16, 12])  # 12: the last 4 dims are not rotated
@pytest.mark.parametrize("harmonic", [True, False])
def test_position_average_equals_the_sum_over_rotated_queries(traditional, dims, harmonic):
    rope = nn.RoPE(dims, traditional=traditional, base=500.0)
    a = np.random.default_rng(0).normal(size=(16, 16))
    moments = a @ a.T
    perm, theta, amp = rope_pairs(rope, 16)
    got = position_averaged_metric(moments, perm, theta, amp, span=53, harmonic=harmonic)
    want = brute_force_metric(rope, moments, 53, harmonic)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    # Fast pairs lose their cross terms, slow pairs keep them.
    assert np.abs(got - moments).max() > 0.1 * np.abs(moments).max()


def random_case(seed, D=12, H=2):
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.gamma(0.5, size=(H, D)), axis=1)[:, ::-1] * 4
    vecs = np.stack([np.linalg.qr(rng.normal(size=(D, D)))[0] for _ in range(H)])
    q = rng.normal(size=(H, D, D)) * np.geomspace(3, 0.1, D)
    metric = q @ q.swapaxes(1, 2)
    return lam, vecs, metric


def test_metric_basis_whitens_the_score_error():
    lam, vecs, metric = random_case(1)
    spectrum, enc, dec = metric_basis(lam, vecs, metric, ridge=0.0)
    for h in range(2):
        cov = (vecs[h] * lam[h]) @ vecs[h].T
        m = metric[h] / np.linalg.eigvalsh(metric[h]).mean()
        # decode ∘ encode = identity; coefficients uncorrelated with variances `spectrum`
        np.testing.assert_allclose(enc[h] @ dec[h].T, np.eye(12), atol=1e-9)
        np.testing.assert_allclose(enc[h].T @ cov @ enc[h], np.diag(spectrum[h]), atol=1e-9)
        # a coefficient error ε costs exactly |ε|² of (normalised) score error
        np.testing.assert_allclose(dec[h].T @ m @ dec[h], np.eye(12), atol=1e-9)
        assert np.all(np.diff(spectrum[h]) <= 1e-12)
        # Hadamard's inequality: no orthogonal basis with per-dim weights does better
        omega = np.einsum("di,de,ei->i", vecs[h], m, vecs[h])
        assert np.sum(np.log(spectrum[h])) <= np.sum(np.log(lam[h] * omega)) + 1e-9


def test_metric_basis_ridge_bounds_the_decoder():
    lam, vecs, metric = random_case(2)
    metric[:, :, 0] = metric[:, 0, :] = 0.0  # no query looks along dim 0
    spectrum, enc, dec = metric_basis(lam, vecs, metric)
    assert np.all(np.isfinite(dec)) and np.abs(dec).max() < 100
    np.testing.assert_allclose(np.einsum("hdi,hdj->hij", enc, dec),
                               np.broadcast_to(np.eye(12), (2, 12, 12)), atol=1e-8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-qm")
    write_tiny_dir(root / "model", head_dim=32)
    model, tokenizer, _ = veloxcore.load(root / "model")
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=3,
                                            sequence_length=96, corpus=TEXT, rope="pre")
    return model, tokenizer, rotations, root


def test_calibration_records_the_query_metric(tiny, tmp_path):
    model, tokenizer, rotations, _ = tiny
    # numpy reference: the queries of layer 1, grouped per KV head, averaged over positions
    attn = model.layers[1].self_attn
    H, G, D = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads, attn.head_dim
    from veloxcore.corpus import sample_windows

    windows = sample_windows(tokenizer.encode(TEXT.text), 3, 96)
    seen = []
    inner = attn.q_proj

    def record(x):
        y = inner(x)
        seen.append(np.array(y.astype(mx.float32)).reshape(-1, H, G, D))
        return y

    attn.q_proj = record
    try:
        for w in windows:
            model(mx.array(w)[None])
    finally:
        attn.q_proj = inner
    q = np.concatenate(seen).astype(np.float64)
    moments = np.einsum("nhgd,nhge->hde", q, q) / len(q)
    want = position_averaged_metric(moments, *rope_pairs(attn.rope, D))
    got = rotations[1].key_metric
    assert got.shape == (H, D, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    post = calibrate_spectral_rotation(model, tokenizer, num_samples=1, sequence_length=64,
                                       corpus=TEXT, rope="post")
    assert all(rot.key_metric is None for rot in post)


def test_bundles_keep_the_metric_and_refuse_a_broken_one(tiny, tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    model, _, rotations, _ = tiny
    path = save_rotations(rotations, tmp_path / "b")
    loaded = load_cached_rotations(path, model=model)
    for a, b in zip(rotations, loaded, strict=True):
        np.testing.assert_array_equal(a.key_metric, b.key_metric)
    from veloxcore.bundle import _sha256

    def rewrite(path, tensors):
        file = path / "rotations.safetensors"
        save_file(tensors, str(file), metadata={"format": "velox.spectral-rotations"})
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["rotations.safetensors"] = {"sha256": _sha256(file),
                                                      "bytes": file.stat().st_size}
        (path / "manifest.json").write_text(json.dumps(manifest))

    tensors = load_file(str(path / "rotations.safetensors"))
    tensors["layers.0.keys.metric"] = tensors["layers.0.keys.metric"][:, :4]
    rewrite(path, tensors)
    with pytest.raises(BundleError, match=r"rotations\.safetensors: tensor "
                                          r"'layers\.0\.keys\.metric' has shape"):
        load_cached_rotations(path, model=model)
    tensors["layers.0.keys.metric"] = np.full((2, 32, 32), np.nan, np.float32)
    rewrite(path, tensors)
    with pytest.raises(BundleError, match=r"'layers\.0\.keys\.metric' has NaN/inf values"):
        load_cached_rotations(path, model=model)
    # A metric in a post-RoPE bundle is refused, not half-used.
    tensors = load_file(str(save_rotations(rotations, tmp_path / "c") / "rotations.safetensors"))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["calibration"]["rope_mode"] = "post"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="belongs to pre-RoPE keys, but this bundle's keys "
                                          "are post-RoPE"):
        load_cached_rotations(tmp_path / "c", model=model)


def test_metric_cache_codes_in_the_whitened_basis(tiny):
    """+qm: keys coded as (k − μ)·E with bits water-filled on the whitened spectrum and
    decoded through G; at 8 bits the logits follow fp16 closely."""
    from mlx_lm.models.cache import KVCache
    from test_caches import logits_with

    from veloxcore.spectral import water_fill_bits

    model, tokenizer, rotations, _ = tiny
    config = parse_method("spectral:wf3/a4+qm", rotations)
    caches = KVCacheBuilder.build(model, config)
    rot = rotations[0]
    spectrum, enc, dec = metric_basis(rot.key_eigenvalues, rot.key_eigenvectors,
                                      rot.key_metric)
    np.testing.assert_allclose(np.array(caches[0].key_basis), enc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(caches[0].key_decoder), dec, rtol=1e-5, atol=1e-6)
    want = np.stack([water_fill_bits(s, 3.0, 0, 8) for s in spectrum])
    np.testing.assert_array_equal(np.array(caches.layer_bits[0]["keys"]), want)
    ids = tokenizer.encode(TEXT.text)[:120]
    reference = logits_with(model, [KVCache() for _ in model.layers], ids)
    fine = KVCacheBuilder.build(model, parse_method("spectral:wf8/a8+qm", rotations))
    got = logits_with(model, fine, ids)
    np.testing.assert_allclose(got, reference, atol=3e-2 * np.abs(reference).max())
    # At equal bits, the whitened basis tracks fp16 closer than the eigenbasis (both
    # re-planned on the prompt): 0.016 vs 0.021 mean logit error when measured.
    errors = {}
    for spec in ("spectral:wf3/a8+qm+ad", "spectral:wf3/a8+ad"):
        built = KVCacheBuilder.build(model, parse_method(spec, rotations))
        errors[spec] = np.abs(logits_with(model, built, ids) - reference).mean()
    assert errors["spectral:wf3/a8+qm+ad"] < 0.9 * errors["spectral:wf3/a8+ad"], errors


def test_metric_basis_excludes_query_aware_bits_and_bit_plans(tiny):
    model, _, rotations, _ = tiny
    with pytest.raises(CacheConfigError, match="exclude each other"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4+qm+qa", rotations))
    config = parse_method("spectral:wf3/a4+qm", rotations)
    config.bit_plan = veloxcore.allocate_bit_plan(rotations, 3.0)
    with pytest.raises(CacheConfigError, match="bit plan"):
        KVCacheBuilder.build(model, config)


def test_metric_cache_needs_the_metric(tiny):
    import dataclasses

    model, _, rotations, _ = tiny
    old = dataclasses.replace(rotations, layers=[
        dataclasses.replace(rot, key_metric=None) for rot in rotations])
    with pytest.raises(CacheConfigError, match="query metric"):
        KVCacheBuilder.build(model, parse_method("spectral:wf3/a4+qm", old))


def test_metric_basis_is_kept_per_rotation_until_its_arrays_change(tiny):
    from veloxcore.caches import key_metric_basis

    _, _, rotations, _ = tiny
    rot = rotations[0]
    first = key_metric_basis(rot)
    assert key_metric_basis(rot) is first
    rot.key_metric = rot.key_metric * 2.0  # a new array: the basis is recomputed
    try:
        again = key_metric_basis(rot)
        assert again is not first
        # M and 2·M give the same normalised metric, hence the same basis
        np.testing.assert_allclose(again[1], first[1], rtol=1e-6, atol=1e-8)
    finally:
        rot.key_metric = rot.key_metric / 2.0


def test_velox_inspect_prints_the_score_weighted_participation_ratio(tiny, tmp_path, capsys):
    from veloxcore.cli import main
    from veloxcore.spectral import compute_participation_ratio

    _, _, rotations, _ = tiny
    path = save_rotations(rotations, tmp_path / "b")
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:5] == ["layer", "key", "PR", "value", "PR"] and "scored" in header
    for rot, line in zip(rotations, lines[2:], strict=False):
        spectrum = metric_basis(rot.key_eigenvalues, rot.key_eigenvectors, rot.key_metric)[0]
        want = np.mean([compute_participation_ratio(s) for s in spectrum])
        assert float(line.split()[3]) == pytest.approx(want, abs=0.006)


def test_queries_are_recorded_after_q_norm(tmp_path):
    """Models with a per-head q_norm (Qwen3 here) hand RoPE the normalised queries: the
    metric must be theirs, as the keys are taken after k_norm."""
    from mlx_lm.models import qwen3

    from veloxcore.calibration import QueryPairEnergy
    from veloxcore.corpus import sample_windows

    write_tiny_dir(tmp_path / "tok")
    _, tokenizer, _ = veloxcore.load(tmp_path / "tok")
    mx.random.seed(1)
    model = qwen3.Model(qwen3.ModelArgs(
        model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=len(SPECIALS) + 256,
        num_key_value_heads=2, max_position_embeddings=512, head_dim=16,
        tie_word_embeddings=True, rope_theta=10000.0))
    attn = model.layers[1].self_attn
    # A q_norm that visibly changes the queries.
    attn.q_norm.weight = mx.linspace(0.2, 3.0, 16)
    mx.eval(model.parameters())
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=2,
                                            sequence_length=64, corpus=TEXT)
    assert not isinstance(attn.q_norm, QueryPairEnergy) and not isinstance(attn.q_proj,
                                                                           QueryPairEnergy)
    seen = []
    inner = attn.q_norm

    def record(x):
        y = inner(x)
        seen.append(np.array(y.astype(mx.float32)).reshape(-1, 2, 2, 16))
        return y

    attn.q_norm = record
    try:
        for w in sample_windows(tokenizer.encode(TEXT.text), 2, 64):
            model(mx.array(w)[None])
    finally:
        attn.q_norm = inner
    q = np.concatenate(seen).astype(np.float64)
    moments = np.einsum("nhgd,nhge->hde", q, q) / len(q)
    want = position_averaged_metric(moments, *rope_pairs(attn.rope, 16))
    np.testing.assert_allclose(rotations[1].key_metric, want, rtol=1e-3,
                               atol=1e-4 * np.abs(want).max())
