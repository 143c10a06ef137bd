"""Teacher-forced evaluation, the eval / bits-sweep / chat commands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_calibration import TEXT
from tinymodel import write_tiny_dir

import veloxcore
from veloxcore import calibrate_spectral_rotation, save_rotations
from veloxcore.caches import KVCacheConfig, parse_method
from veloxcore.evaluate import evaluate_methods

BIN = Path(sys.executable).parent
BUNDLE = Path(__file__).resolve().parent.parent / "assets/bundles/smollm2-135m-instruct-pre"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_dir(root / "model", head_dim=32)
    model, tokenizer, _ = veloxcore.load(root / "model")
    rotations = calibrate_spectral_rotation(model, tokenizer, num_samples=4, sequence_length=96,
                                            corpus=TEXT)
    save_rotations(rotations, root / "bundle")
    (root / "text.txt").write_text(TEXT.text)
    return root, model, tokenizer, rotations


def test_reference_and_lossless_methods_score_zero_and_lossy_ones_do_not(tiny):
    _, model, tokenizer, rotations = tiny
    configs = {
        "fp16": parse_method("fp16"),
        "spectral16": KVCacheConfig(method="spectral", rotations=rotations, signal_bits=16,
                                    noise_bits=16, value_bits=16),
        "rvq2": parse_method("rvq2"),
        "affine2g32": parse_method("affine2g32"),
    }
    results = {r.method: r for r in evaluate_methods(model, tokenizer, configs, TEXT.text,
                                                     context=200, chunk=64)}
    fp16 = results["fp16"]
    assert fp16.kld == pytest.approx(0.0, abs=1e-6) and fp16.delta_ppl_pct == pytest.approx(0.0)
    assert fp16.top1_agreement == 1.0 and fp16.bits_per_element == 16.0
    assert results["spectral16"].kld < 1e-3 and results["spectral16"].top1_agreement > 0.97
    for lossy in ("rvq2", "affine2g32"):
        assert results[lossy].kld > results["spectral16"].kld
        assert results[lossy].bits_per_element < 4
        assert results[lossy].kv_bytes < fp16.kv_bytes
    assert all(r.context == 200 and r.perplexity > 1 for r in results.values())


def test_too_short_text_is_refused(tiny):
    _, model, tokenizer, _ = tiny
    with pytest.raises(veloxcore.VeloxError, match="tokens; 1001 are needed"):
        evaluate_methods(model, tokenizer, {"fp16": parse_method("fp16")}, "short", 1000)


def test_eval_and_bits_sweep_commands(tiny, tmp_path):
    root, *_ = tiny
    common = ["--model", str(root / "model"), "--bundle", str(root / "bundle"),
              "--text", str(root / "text.txt"), "--ctx", "128", "--chunk", "64"]
    out = subprocess.run([str(BIN / "velox"), "eval", *common, "--methods",
                          "fp16,affine4g32,rvq3,spectral:wf3/a4g32", "--json",
                          str(tmp_path / "e.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| spectral:wf3/a4g32 | 128 |" in out.stdout
    data = json.loads((tmp_path / "e.json").read_text())
    assert [r["method"] for r in data["results"]] == ["fp16", "affine4g32", "rvq3",
                                                      "spectral:wf3/a4g32"]
    assert len(data["text_sha256"]) == 64
    sweep = subprocess.run([str(BIN / "velox"), "bits-sweep", *common, "--methods",
                            "fp16,affine4g32,affine8g32,spectral:wf2/a4g32",
                            "--out", str(tmp_path / "s")], capture_output=True, text=True,
                           timeout=300)
    assert sweep.returncode == 0, sweep.stderr
    assert (tmp_path / "s" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["results"]) == 4
    bad = subprocess.run([str(BIN / "velox"), "eval", *common, "--methods", "spectral:nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot parse method 'spectral:nope'" in bad.stderr


def test_cli_chat_through_the_spectral_cache_answers_paris():
    out = subprocess.run([str(BIN / "velox"), "chat", "--method", "spectral", "--bundle",
                          str(BUNDLE), "--prompt", "What is the capital of France?",
                          "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "KV " in out.stderr and "bits/elem" in out.stderr
