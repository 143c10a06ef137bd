"""Calibration recovers planted covariances in both RoPE modes; progress, cancel, distributed."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from tinymodel import tiny_model, write_tiny_dir

import veloxcore
from veloxcore import CalibrationCancelled, Corpus, calibrate_spectral_rotation
from veloxcore.calibration import CovarianceCapture, RopeInverter

TEXT = Corpus.from_text("test", " ".join(
    f"The {w} number {i} is written as {i * 7 % 1000} and then we move on to line {i}."
    for i, w in enumerate(["first", "second", "third", "fourth", "fifth"] * 60)))
BIN = Path(sys.executable).parent


def numpy_rope(x, positions, base, traditional, dims=None):
    """Reference RoPE in numpy: rotate pairs by position · base^(−2i/dims)."""
    x = np.array(x, dtype=np.float64)
    d = dims or x.shape[-1]
    freqs = base ** (-np.arange(0, d, 2) / d)
    angles = np.asarray(positions)[:, None] * freqs[None]
    cos, sin = np.cos(angles), np.sin(angles)
    out = x.copy()
    if traditional:
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2], out[..., 1:d:2] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., : d // 2], x[..., d // 2: d]
        out[..., : d // 2], out[..., d // 2: d] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims", [16, 8])
def test_rope_inverter_undoes_rope(traditional, dims):
    rope = nn.RoPE(dims, traditional=traditional, base=10000.0, scale=0.5)
    x = mx.random.normal((1, 2, 12, 16), key=mx.random.key(3))
    roped = rope(x, offset=37)
    np.testing.assert_allclose(np.array(RopeInverter(rope, 16)(roped, 37)), np.array(x),
                               atol=1e-5)


@pytest.mark.parametrize("traditional", [True, False])
def test_capture_recovers_planted_covariance(traditional):
    heads, d, rank = 2, 16, 3
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(heads, rank, d))
    truth = np.einsum("hrd,hre->hde", mixing, mixing)  # E[k kᵀ] for k = z·A, z ~ N(0, I)
    rope = nn.RoPE(d, traditional=traditional, base=10000.0)
    pre = CovarianceCapture(heads, d, RopeInverter(rope, d))
    post = CovarianceCapture(heads, d, None)
    n, chunk = 6000, 500
    post_reference = np.zeros((heads, d, d))
    for start in range(0, n, chunk):
        z = rng.normal(size=(heads, chunk, rank))
        keys = np.einsum("hlr,hrd->hld", z, mixing)[None]
        roped = rope(mx.array(keys, dtype=mx.float32), offset=start)
        for capture in (pre, post):
            capture.update_and_fetch(roped, roped)
        ref = numpy_rope(keys[0], np.arange(start, start + chunk), 10000.0, traditional)
        post_reference += np.einsum("hld,hle->hde", ref, ref)
    estimate = np.array(pre.key_moment) / pre.count
    # Sampling error of a 6000-sample covariance: a few percent of the scale.
    assert np.abs(estimate - truth).max() < 0.08 * np.abs(truth).max()
    np.testing.assert_allclose(np.array(post.key_moment), post_reference, rtol=1e-4,
                               atol=1e-3 * np.abs(post_reference).max())
    # Pre-RoPE keys stay in the planted rank-3 subspace exactly; post-RoPE ones do not.
    pre_vals = np.linalg.eigvalsh(estimate)[:, ::-1]
    post_vals = np.linalg.eigvalsh(post_reference / post.count)[:, ::-1]
    assert np.all(pre_vals[:, rank:] < 1e-4 * pre_vals[:, :1])
    assert np.all(post_vals[:, rank] > 1e-2 * post_vals[:, 0])


def low_rank_model(rank=2):
    """A tiny llama whose layer-0 keys (before RoPE) live in a planted rank-2 subspace."""
    model = tiny_model(seed=1)
    attn = model.layers[0].self_attn
    heads, d = model.args.num_key_value_heads, model.args.head_dim
    rng = np.random.default_rng(1)
    bases = []
    weight = np.zeros((heads * d, model.args.hidden_size), dtype=np.float32)
    for h in range(heads):
        u = np.linalg.qr(rng.normal(size=(d, rank)))[0]
        weight[h * d:(h + 1) * d] = u @ rng.normal(size=(rank, model.args.hidden_size))
        bases.append(u)
    attn.k_proj.weight = mx.array(weight)
    return model, bases


def reference_moments(model, tokenizer, rotations, unrope):
    """Mean and covariance from mlx-lm's own KVCache (post-RoPE keys), un-roped in numpy."""
    from veloxcore.corpus import sample_windows

    windows = sample_windows(tokenizer.encode(TEXT.text), rotations.num_samples,
                             rotations.sequence_length, rotations.seed)
    d = model.args.head_dim
    total, vector_sum = None, 0.0
    for window in windows:
        caches = [KVCache() for _ in model.layers]
        model(mx.array(window)[None], cache=caches)
        keys = np.array(caches[0].keys[0], dtype=np.float64)[:, rotations.sink_tokens:len(window)]
        if unrope:
            positions = -np.arange(rotations.sink_tokens, len(window))
            keys = numpy_rope(keys, positions, model.args.rope_theta, True, d)
        m = np.einsum("hld,hle->hde", keys, keys)
        total = m if total is None else total + m
        vector_sum = vector_sum + keys.sum(axis=1)
    mean = vector_sum / rotations.token_count
    return mean, total / rotations.token_count - mean[:, :, None] * mean[:, None, :]


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_calibration_matches_numpy_reference_on_planted_model(tmp_path, mode):
    write_tiny_dir(tmp_path / "tiny")
    _, tokenizer, _ = veloxcore.load(tmp_path / "tiny")
    model, bases = low_rank_model()
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=4, sequence_length=96,
                                            corpus=TEXT, rope=mode, seed=3)
    layer0 = rotations[0]
    assert layer0.rope_mode == mode and layer0.token_count == 4 * (96 - 4)
    mean, reference = reference_moments(model, tokenizer, rotations, unrope=(mode == "pre"))
    np.testing.assert_allclose(layer0.key_mean, mean, rtol=1e-3, atol=1e-4 * np.abs(mean).max())
    for h in range(model.args.num_key_value_heads):
        vals, vecs = layer0.key_eigenvalues[h], layer0.key_eigenvectors[h]
        ref_vals = np.linalg.eigvalsh(reference[h])[::-1]
        np.testing.assert_allclose(vals, ref_vals, rtol=1e-3, atol=1e-4 * ref_vals[0])
        assert np.all(np.diff(vals) <= 1e-6 * vals[0])  # descending
        np.testing.assert_allclose(vecs.T @ vecs, np.eye(vals.size), atol=1e-4)
        if mode == "pre":
            # The planted subspace: eigenvalues beyond rank 2 vanish and the top-2
            # eigenvectors span the planted basis (principal angles ~ 0).
            assert np.all(vals[2:] < 1e-4 * vals[0])
            overlap = np.linalg.svd(bases[h].T @ vecs[:, :2], compute_uv=False)
            np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
        else:
            assert vals[2] > 1e-3 * vals[0]  # RoPE spreads the energy


def test_progress_events_grow_and_cancel_stops(tmp_path):
    write_tiny_dir(tmp_path / "tiny")
    model, tokenizer, _ = veloxcore.load(tmp_path / "tiny")
    events = []
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=5, sequence_length=64,
                                            corpus=TEXT, progress=events.append, progress_layer=1)
    assert [e.samples_done for e in events] == [1, 2, 3, 4, 5]
    assert [e.tokens_done for e in events] == [64, 128, 192, 256, 320]
    assert events[-1].eta_s == 0 and all(e.tokens_per_s > 0 for e in events)
    assert events[-1].layer == 1 and events[-1].key_eigenvalues.shape == (2, 16)
    np.testing.assert_allclose(events[-1].key_eigenvalues, rotations[1].key_eigenvalues,
                               rtol=1e-3, atol=1e-5 * rotations[1].key_eigenvalues.max())

    cancel = threading.Event()
    seen = []

    def stop_after_two(event):
        seen.append(event.samples_done)
        if event.samples_done == 2:
            cancel.set()

    with pytest.raises(CalibrationCancelled):
        calibrate_spectral_rotation(model, tokenizer, num_samples=5, sequence_length=64,
                                    corpus=TEXT, progress=stop_after_two, cancel=cancel)
    assert seen == [1, 2]


def test_peak_memory_does_not_grow_with_samples(tmp_path):
    write_tiny_dir(tmp_path / "tiny")
    model, tokenizer, _ = veloxcore.load(tmp_path / "tiny")
    peaks = []
    for n in (2, 16):
        mx.reset_peak_memory()
        calibrate_spectral_rotation(model, tokenizer, num_samples=n, sequence_length=64,
                                    corpus=TEXT)
        peaks.append(mx.get_peak_memory())
    assert peaks[1] <= peaks[0] * 1.1 + 65536


def write_calibration_text(path):
    path.write_text(TEXT.text)
    return path


def test_cli_ctrl_c_cancels_and_writes_nothing(tmp_path):
    write_tiny_dir(tmp_path / "tiny")
    corpus = write_calibration_text(tmp_path / "corpus.txt")
    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [str(BIN / "velox"), "calibrate", "--model", str(tmp_path / "tiny"), "--samples", "100000",
         "--seq-len", "64", "--corpus", str(corpus), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait for the first progress line, then press Ctrl-C.
    line = ""
    deadline = time.time() + 120
    while "samples" not in line and time.time() < deadline:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nothing was written" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_distributed_two_ranks_equal_one(tmp_path):
    write_tiny_dir(tmp_path / "tiny")
    corpus = write_calibration_text(tmp_path / "corpus.txt")
    common = ["calibrate", "--model", str(tmp_path / "tiny"), "--samples", "6", "--seq-len", "64",
              "--corpus", str(corpus), "--seed", "5"]
    single = subprocess.run([str(BIN / "velox"), *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ)
    multi = subprocess.run(
        [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--python", sys.executable,
         str(BIN / "velox"), *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert "on 2 ranks" in multi.stdout + multi.stderr
    one = veloxcore.load_cached_rotations(tmp_path / "one")
    two = veloxcore.load_cached_rotations(tmp_path / "two")
    assert one.token_count == two.token_count == 6 * 60
    for a, b in zip(one, two, strict=True):
        for va, vb, ea, eb in ((a.key_eigenvalues, b.key_eigenvalues, a.key_eigenvectors,
                                b.key_eigenvectors),
                               (a.value_eigenvalues, b.value_eigenvalues, a.value_eigenvectors,
                                b.value_eigenvectors)):
            # Tolerance: float32 sums in another order, then float32 eigh.
            np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-5 * va.max())
            # Compare the leading eigenvectors up to sign where eigenvalues are distinct.
            for h in range(va.shape[0]):
                dots = np.abs(np.sum(ea[h, :, :3] * eb[h, :, :3], axis=0))
                np.testing.assert_allclose(dots, 1.0, atol=1e-3)
        # The query statistics are summed over ranks too.
        np.testing.assert_allclose(a.key_importance, b.key_importance, rtol=1e-4)
        np.testing.assert_allclose(a.key_metric, b.key_metric, rtol=1e-4,
                                   atol=1e-5 * np.abs(a.key_metric).max())


@pytest.mark.parametrize("traditional", [True, False])
def test_query_pair_energy_matches_numpy(traditional):
    from veloxcore.calibration import pair_energy

    x = np.random.default_rng(4).normal(size=(2, 5, 3, 8)).astype(np.float32)
    got = np.array(pair_energy(mx.array(x), traditional))
    if traditional:
        want = x[..., 0::2] ** 2 + x[..., 1::2] ** 2
    else:
        want = x[..., :4] ** 2 + x[..., 4:] ** 2
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_calibration_records_query_importance_and_restores_the_model(tmp_path):
    from veloxcore.calibration import QueryPairEnergy

    write_tiny_dir(tmp_path / "tiny")
    model, tokenizer, _ = veloxcore.load(tmp_path / "tiny")
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=2, sequence_length=64,
                                            corpus=TEXT)
    for rot in rotations:
        assert rot.key_importance.shape == (2, 16)
        assert np.all(rot.key_importance > 0)
        np.testing.assert_allclose(rot.key_importance.mean(axis=1), 1.0, rtol=1e-5)
    assert not any(isinstance(layer.self_attn.q_proj, QueryPairEnergy) for layer in model.layers)
