"""Job bodies run by the engine's worker thread (the only studio module using veloxcore).

Each job takes ``(state, job, **params)``, reports progress with ``yield`` or
``job.emit`` and returns plain Python data for the views. Jobs that change the
state set ``job.commit``, which the worker runs only if the job was not cancelled.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import veloxcore
from veloxcore.generate import stream_reply


def load_model(state, job, source: str):
    def progress(stage: str, fraction: float) -> None:
        job.emit({"stage": stage, "fraction": fraction})

    model, tokenizer, info = veloxcore.load(source, progress=progress)

    def commit():
        # Rotations belong to the model they were calibrated on.
        state.model, state.tokenizer, state.info = model, tokenizer, info
        state.rotations = None

    job.commit = commit
    return info.to_dict()


def calibrate(state, job, corpus: str = "bundled", samples: int = 64, seq_len: int = 1024,
              rope: str = "pre", seed: int = 0, progress_layer: int = 0,
              generated_tokens: int = 512):
    """Calibrate rotations; stream the live layer's eigenvalues after every sample."""
    from veloxcore.corpus import DEFAULT_SEED_PROMPTS, generate_corpus, load_corpus

    _require_model(state)
    start = time.perf_counter()
    try:
        if corpus == "generated":
            prompts = len(DEFAULT_SEED_PROMPTS)
            job.emit({"stage": "generating", "done": 0, "total": prompts,
                      "log": f"Calibrate: the model writes its corpus ({prompts} replies of up "
                             f"to {generated_tokens} tokens)…"})

            def generated(done: int, total: int) -> None:
                job.emit({"stage": "generating", "done": done, "total": total,
                          "log": f"Calibrate: generated reply {done}/{total}"})

            text = generate_corpus(state.model, state.tokenizer,
                                   tokens_per_prompt=generated_tokens, seed=seed,
                                   progress=generated, cancel=job.cancelled)
        else:
            job.emit({"stage": "corpus", "log": f"Calibrate: reading corpus {corpus}"})
            text = load_corpus(corpus)
        job.check()
        job.emit({"stage": "calibrating", "corpus": text.name,
                  "log": f"Calibrate: {samples} × {seq_len} tokens of “{text.name}” "
                         f"({len(text.text):,} characters), keys {rope}-RoPE, seed {seed}"})

        def progress(p) -> None:
            event = {
                "stage": "sample", "samples_done": p.samples_done, "num_samples": p.num_samples,
                "tokens_done": p.tokens_done, "tokens_per_s": p.tokens_per_s, "eta_s": p.eta_s,
                "layer": p.layer, "key_eigenvalues": np.asarray(p.key_eigenvalues, np.float64),
                "value_eigenvalues": np.asarray(p.value_eigenvalues, np.float64),
            }
            if p.samples_done == p.num_samples:
                event["log"] = (f"Calibrate: all {p.num_samples} samples in "
                                f"({p.tokens_per_s:,.0f} tok/s); eigendecomposing every layer")
            job.emit(event)

        rotations = veloxcore.calibrate_spectral_rotation(
            state.model, state.tokenizer, num_samples=samples, sequence_length=seq_len,
            corpus=text, rope=rope, seed=seed, progress=progress, cancel=job.cancelled,
            progress_layer=progress_layer)
    except veloxcore.VeloxError:
        job.check()  # a cancelled run (CalibrationCancelled, CorpusError) reports as cancelled
        raise
    job.check()
    job.commit = lambda: setattr(state, "rotations", rotations)
    summary = rotation_summary(rotations, state, source="calibration")
    summary["elapsed_s"] = time.perf_counter() - start
    job.emit({"stage": "done", "log": f"Calibrate: done in {summary['elapsed_s']:.1f} s: "
                                      f"{summary['num_layers']} layers × "
                                      f"{summary['num_kv_heads']} KV heads × "
                                      f"{summary['head_dim']} dims, "
                                      f"{summary['token_count']:,} tokens per head"})
    return summary


def measure_sensitivity(state, job, corpus: str = "generated", tokens: int = 1024):
    """Measure each layer's cost of coded keys and values (veloxcore.sensitivity) for the
    current rotations; they keep it (``+la`` uses it, exports write it)."""
    from veloxcore.sensitivity import (
        allocate_layer_bits,
        measure_layer_sensitivity,
        sensitivity_tokens,
    )

    _require_model(state)
    if state.rotations is None:
        raise veloxcore.VeloxError("no rotations: run a calibration or load a bundle first")
    start = time.perf_counter()
    if corpus == "generated":
        job.emit({"stage": "generating", "log": "Sensitivity: the model writes its text…"})
    try:
        text, ids = sensitivity_tokens(state.model, state.tokenizer, corpus, tokens,
                                       cancel=job.cancelled)
    except veloxcore.VeloxError:
        job.check()  # a cancelled generation reports as cancelled
        raise
    job.check()
    job.emit({"stage": "measuring", "log": f"Sensitivity: {len(ids)} tokens of "
                                          f"“{text.name}”, one layer at a time"})
    steps = measure_layer_sensitivity(state.model, state.rotations, ids,
                                      chunk=min(512, len(ids) // 2), corpus_sha256=text.sha256)
    while True:
        job.check()
        try:
            stage, done, total = next(steps)
        except StopIteration as finished:
            sensitivity = finished.value
            break
        yield {"stage": "layer", "done": done, "total": total, "what": stage}
    rotations = state.rotations
    job.commit = lambda: setattr(rotations, "layer_sensitivity", sensitivity)
    plan = allocate_layer_bits(sensitivity, 3.0, 4)
    result = {"keys": {b: v.tolist() for b, v in sensitivity.keys.items()},
              "values": {b: v.tolist() for b, v in sensitivity.values.items()},
              "tokens": sensitivity.tokens, "allocation": plan,
              "elapsed_s": time.perf_counter() - start}
    job.emit({"stage": "done", "log": f"Sensitivity: done in {result['elapsed_s']:.0f} s; "
                                      f"+la at 3/4 bits: modelled KL "
                                      f"{plan['predicted_kl']:.4f} vs {plan['uniform_kl']:.4f} "
                                      "with the same bits in every layer"})
    return result


def export_bundle(state, job, directory: str, bit_plan: dict | None = None):
    if state.rotations is None:
        raise veloxcore.VeloxError("no rotations to export: run a calibration or load a bundle "
                                   "first")
    path = veloxcore.save_rotations(state.rotations, directory, bit_plan=bit_plan)
    files = sorted(p.name for p in Path(path).iterdir())
    job.emit({"stage": "done", "log": f"Exported bundle to {path} ({', '.join(files)})"})
    return {"path": str(path), "files": files, "bit_plan": bit_plan is not None}


def load_bundle(state, job, directory: str):
    """Load a bundle; verified against the loaded model when there is one."""
    from veloxcore.bundle import load_bit_plan

    rotations = veloxcore.load_cached_rotations(directory, model=state.model)
    plan = load_bit_plan(directory)
    job.check()
    job.commit = lambda: setattr(state, "rotations", rotations)
    summary = rotation_summary(rotations, state, source=str(Path(directory).expanduser()))
    summary["bit_plan"] = plan
    job.emit({"stage": "done",
              "log": f"Loaded bundle {directory}: {summary['num_layers']} layers, "
                     f"{summary['num_samples']} × {summary['sequence_length']} tokens of "
                     f"“{summary['corpus']}”" + (", with a bit plan" if plan else "")
                     + ("" if state.model is not None else " (not checked: no model loaded)")})
    return summary


def rotation_summary(rotations, state, source: str) -> dict:
    """What views see of rotations: eigenvalues (layers × heads × head_dim), the spectra of
    the score-weighted key basis (+qm; None without the query metric) and the record."""
    from veloxcore.caches import key_metric_basis

    first = rotations[0]
    scored = (np.stack([key_metric_basis(r)[0] for r in rotations]).astype(np.float64)
              if rotations.has_key_metric else None)
    return {
        "source": source,
        "num_layers": len(rotations),
        "num_kv_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "rope_mode": rotations.rope_mode,
        "num_samples": rotations.num_samples,
        "sequence_length": rotations.sequence_length,
        "token_count": rotations.token_count,
        "sink_tokens": rotations.sink_tokens,
        "corpus": rotations.corpus_name,
        "seed": rotations.seed,
        "model": dict(rotations.model_fingerprint),
        "model_name": state.info.name if state.info is not None else None,
        "context_length": state.info.context_length if state.info is not None else None,
        "key_eigenvalues": np.stack([r.key_eigenvalues for r in rotations]).astype(np.float64),
        "value_eigenvalues": np.stack([r.value_eigenvalues for r in rotations]).astype(np.float64),
        "key_metric_spectra": scored,
        "bit_plan": None,
    }


def _require_model(state) -> None:
    if state.model is None:
        raise veloxcore.VeloxError("no model is loaded; load one in the Model view first")


# ---- chat ------------------------------------------------------------------------
# What the chat's "spectral" method uses when the view names no configuration.
DEFAULT_SPECTRAL = "spectral:wf3/a4g64+qm+ad+x1.5+vh+la"
# The default for rotations calibrated before the query metric (+qm).
FALLBACK_SPECTRAL = "spectral:wf3/a4g64+tf0.7+qa+ad+x1.5+vh+la"


def generate(state, job, messages: list[dict], max_tokens: int = 256, cache=None,
             temperature: float = 0.0):
    """Stream one assistant reply through a KV cache built for it.

    cache: None or "fp16", a method spec ("affine4", "spectral:wf3/a4g64+qm+ad+x1.5+vh+la"),
    "spectral" (the default spectral configuration) or ``{"bit_plan": plan,
    "token_scale": bool}`` (a Bits view plan). Spectral caches use the engine's
    rotations; without any, the bundle shipped for the loaded model is loaded
    (and committed, and returned as ``"rotations"``), else the job fails.

    Events: ``{"stage": "prompt", prompt_tokens, context_length, max_tokens,
    method}`` before generating, ``{"text", "tokens", "tokens_per_s"}`` per token,
    and ``{"stage": "done", ...}`` with the result (also when stopped: the job then
    reports as cancelled, the event still carries the partial reply's numbers).
    """
    from veloxcore.caches import KVCacheBuilder
    from veloxcore.generate import chat_prompt

    _require_model(state)
    config, label, loaded = _cache_config(state, job, cache)
    prompt_tokens = len(chat_prompt(state.tokenizer, messages))
    context = int(state.info.context_length or 0)
    if context and prompt_tokens >= context:
        raise veloxcore.VeloxError(
            f"This conversation is {prompt_tokens:,} tokens long, but {state.info.name} reads at "
            f"most {context:,} tokens (its context window), so it cannot reply. Start a new chat "
            "or shorten the message or the system prompt.")
    if context:
        max_tokens = max(1, min(max_tokens, context - prompt_tokens))
    yield {"stage": "prompt", "prompt_tokens": prompt_tokens, "context_length": context,
           "max_tokens": max_tokens, "method": label}
    caches = KVCacheBuilder.build(state.model, config)
    for note in getattr(caches, "notes", []):
        job.emit({"log": f"Chat: {note}"})
    if getattr(caches, "kernel_backend", None):
        job.emit({"log": f"Chat: decoding with the fused {caches.kernel_backend} kernels"})
    pieces: list[str] = []
    last = None
    stopped = False
    start = time.perf_counter()
    for chunk in stream_reply(state.model, state.tokenizer, messages, max_tokens=max_tokens,
                              temperature=temperature, prompt_cache=caches):
        pieces.append(chunk.text)
        last = chunk
        yield {"text": chunk.text, "tokens": chunk.generation_tokens,
               "tokens_per_s": chunk.generation_tps}
        if job.cancelled.is_set():
            stopped = True
            break
    elapsed = time.perf_counter() - start
    result = {
        "text": "".join(pieces), "pieces": pieces, "method": label,
        "tokens": last.generation_tokens if last else 0,
        "tokens_per_s": last.generation_tps if last else 0.0,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": last.prompt_tps if last else 0.0,
        "finish_reason": "stop" if stopped else (last.finish_reason if last else None),
        "stopped": stopped, "elapsed_s": elapsed, "context_length": context,
        "max_tokens": max_tokens, "temperature": temperature,
        **kv_usage(caches, state.model),
    }
    if loaded is not None:
        rotations, summary = loaded
        job.commit = lambda: setattr(state, "rotations", rotations)
        result["rotations"] = summary
    yield {"stage": "done", **result}
    return result


def kv_usage(caches, model) -> dict:
    """The cache's measured bytes for the tokens it holds (codes, scales, exact sink
    and recent tokens; ``veloxcore.caches.cache_memory``) next to the fp16 cache, and
    how many tokens after the sinks are still exact (decoded tokens are coded
    ``append_batch`` at a time)."""
    from veloxcore.caches import cache_memory

    memory = cache_memory(caches, model)
    return {"kv_bytes": int(memory.nbytes), "kv_fp16_bytes": int(memory.fp16_nbytes),
            "kv_tokens": int(memory.tokens), "bits_per_element": float(memory.bits_per_element),
            "kv_uncoded_tokens": int(memory.uncoded_tokens),
            "kv_append_batch": max((getattr(c, "append_batch", 1) for c in caches),
                                   default=1)}


def _cache_config(state, job, cache):
    """(KVCacheConfig, label, (rotations, summary) if a shipped bundle was loaded)."""
    from veloxcore.caches import KVCacheConfig, parse_method

    if cache is None or cache == "fp16":
        return KVCacheConfig(method="fp16"), "fp16", None
    if isinstance(cache, str) and not cache.startswith("spectral"):
        return parse_method(cache), cache, None
    rotations, loaded = state.rotations, None
    if rotations is None:
        rotations, directory = _shipped_rotations(state)
        job.emit({"log": f"Chat: no rotations loaded; using the bundle shipped for "
                         f"{state.info.name} ({_shipped_name(directory)})"})
        summary = rotation_summary(rotations, state, source=_shipped_name(directory))
        summary["bit_plan"] = None
        loaded = (rotations, summary)
    if isinstance(cache, dict):
        plan = cache["bit_plan"]
        config = plan_config(rotations, plan, bool(cache.get("token_scale")))
        label = cache.get("label") or plan_label(plan, config.token_scale)
        return config, label, loaded
    spec = DEFAULT_SPECTRAL if cache == "spectral" else cache
    if "qm" in spec.split("+") and not rotations.has_key_metric:
        # Rotations from an older calibration carry no query metric.
        spec = FALLBACK_SPECTRAL if spec == DEFAULT_SPECTRAL else spec.replace("+qm", "+qa")
        job.emit({"log": "Chat: these rotations have no query metric; using "
                         f"{spec} (recalibrate for the metric-weighted key basis)"})
    body, *modifiers = spec.split("+")
    if "qa" in modifiers and not rotations.has_key_importance:
        # Rotations from an older calibration carry no query statistics.
        modifiers = [m for m in modifiers if m != "qa"]
        spec = "+".join([body, *modifiers])
        job.emit({"log": "Chat: these rotations have no query statistics; using "
                         f"{spec} (recalibrate for query-aware key bits)"})
    if "la" in modifiers and getattr(rotations, "layer_sensitivity", None) is None:
        # Layer sensitivity is measured separately (velox sensitivity).
        spec = "+".join([body, *(m for m in modifiers if m != "la")])
        job.emit({"log": "Chat: this bundle has no measured layer sensitivity; using "
                         f"{spec} (Calibrate → Measure layer sensitivity, or `velox "
                         "sensitivity --bundle DIR`, spreads the bits over layers)"})
    return parse_method(spec, rotations), spec, loaded


def plan_config(rotations, plan: dict, token_scale: bool = False):
    """The spectral KVCacheConfig of a Bits view plan (bit_plan.json format).

    Per-dimension key bits (and spectral value bits) come from the plan's layers.
    ``plan["value_method"] == "affine"`` codes values with mlx's group-wise affine
    quantisation at ``value_bits`` / ``value_group_size`` instead; the cache then
    ignores the plan's per-dimension value bits.
    """
    from veloxcore.caches import CacheConfigError, KVCacheConfig

    config = KVCacheConfig(method="spectral", rotations=rotations, bit_plan=plan,
                           token_scale=bool(token_scale))
    method = plan.get("value_method", "spectral")
    if method == "affine":
        config.value_method = "affine"
        config.value_bits = int(plan.get("value_bits", 4))
        config.value_group_size = int(plan.get("value_group_size", 64))
    elif method != "spectral":
        raise CacheConfigError(f"bit plan: value_method must be 'spectral' or 'affine', "
                               f"not {method!r}")
    return config


def plan_label(plan: dict, token_scale: bool = False) -> str:
    """"spectral: plan K3/V3", "… K4/1/Va4g64+ts" (signal/noise keys, affine values)."""
    if plan.get("water_filling", True) or "signal_bits" not in plan:
        keys = f"K{plan['key_avg_bits']:g}"
    else:
        keys = f"K{plan['signal_bits']}/{plan['noise_bits']}"
    if plan.get("value_method") == "affine":
        values = f"Va{plan.get('value_bits', 4)}g{plan.get('value_group_size', 64)}"
    else:
        values = f"V{plan['value_avg_bits']:g}"
    return f"spectral: plan {keys}/{values}" + ("+ts" if token_scale else "")


def shipped_bundles() -> list[Path]:
    from veloxcore.corpus import assets_dir

    root = assets_dir() / "bundles"
    return sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) \
        if root.is_dir() else []


def _shipped_name(directory: Path) -> str:
    return f"assets/bundles/{directory.name} (shipped)"


def _shipped_rotations(state):
    """The bundle in assets/bundles whose model fingerprint is the loaded model's."""
    from veloxcore.bundle import read_manifest

    info = state.info
    for directory in shipped_bundles():
        try:
            model = read_manifest(directory)["model"]
        except veloxcore.BundleError:
            continue
        if all(model.get(k) == getattr(info, k) for k in ("architecture", "config_sha256",
                                                           "weights_sha256")):
            return veloxcore.load_cached_rotations(directory, model=state.model), directory
    raise veloxcore.VeloxError(
        f"The spectral cache needs calibrated rotations, and none ship with {info.name} (only "
        "the default model has a bundle). Calibrate it first (Calibrate view, Ctrl+R) or load "
        "a rotation bundle (File ▸ Load bundle…, Ctrl+Shift+O).")


# ---- measure -----------------------------------------------------------------------
def measure(state, job, bit_plan: dict, token_scale: bool = False, context: int = 256,
            chunk: int = 128, text: str | None = None):
    """Teacher-forced KL / perplexity of the Bits view's plan against fp16 on held-out
    text, plus the measured relative MSE of every layer's keys and values (the same
    quantity the plan predicts: E‖x − x̂‖² / Σλ per KV head; for affine values the
    same ratio, with no prediction to compare it to). The cache is ``plan_config``."""
    from veloxcore.caches import KVCacheBuilder, KVCacheConfig
    from veloxcore.evaluate import evaluate_methods, load_eval_text

    _require_model(state)
    if state.rotations is None:
        raise veloxcore.VeloxError("no rotations to measure: calibrate or load a bundle first")
    start = time.perf_counter()
    name, body, sha = load_eval_text(text)
    config = plan_config(state.rotations, bit_plan, token_scale)
    label = plan_label(bit_plan, token_scale)
    job.emit({"stage": "evaluating", "done": 0, "total": context,
              "log": f"Measure: {label} vs fp16 on {context} tokens of {name}"})

    def progress(stage: str, done: int, total: int) -> None:
        job.emit({"stage": stage, "done": done, "total": total})

    results = evaluate_methods(state.model, state.tokenizer,
                               {"fp16": KVCacheConfig(method="fp16"), label: config}, body,
                               context=context, chunk=chunk, progress=progress,
                               cancel=job.cancelled)
    job.check()
    job.emit({"stage": "mse", "log": "Measure: per-layer key/value error"})
    mse = _measured_mse(state, KVCacheBuilder.build(state.model, config), body, context)
    job.check()
    out = {"text": name, "text_sha256": sha, "context": context, "chunk": chunk,
           "method": label, "results": [r.to_dict() for r in results],
           "key_mse": mse["keys"], "value_mse": mse["values"],
           "elapsed_s": time.perf_counter() - start}
    r = results[-1]
    job.emit({"stage": "done",
              "log": f"Measure: {label}: KL {r.kld:.4f}, ΔPPL {r.delta_ppl_pct:+.1f} %, top-1 "
                     f"{100 * r.top1_agreement:.1f} %, {r.bits_per_element:.2f} bits/elem "
                     f"({out['elapsed_s']:.1f} s)"})
    return out


class _Recorder:
    """Wraps a layer cache; keeps what arrives and what attention gets back."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen = []

    def update_and_fetch(self, keys, values):
        out = self.inner.update_and_fetch(keys, values)
        self.seen.append((keys, values, out))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _measured_mse(state, caches, text: str, context: int) -> dict:
    """Per (layer, head): Σ_tokens ‖x − x̂‖² / (coded tokens · Σλ), keys and values."""
    import mlx.core as mx

    ids = state.tokenizer.encode(text)[:context]
    wrapped = [_Recorder(c) for c in caches]
    mx.eval(state.model(mx.array(ids)[None], cache=wrapped))
    out = {"keys": [], "values": []}
    for w, rot in zip(wrapped, state.rotations, strict=True):
        (keys, values, (k_hat, v_hat)), = w.seen  # one forward pass
        coded = max(1, int(getattr(w.inner, "coded", keys.shape[2])))
        for part, x, x_hat, lam in (("keys", keys, k_hat, rot.key_eigenvalues),
                                    ("values", values, v_hat, rot.value_eigenvalues)):
            err = mx.sum(mx.square(x.astype(mx.float32) - x_hat.astype(mx.float32)),
                         axis=(0, 2, 3))
            total = np.asarray(lam, dtype=np.float64).sum(axis=-1) * coded
            out[part].append((np.asarray(err, dtype=np.float64) / total).tolist())
    return out


def load_shipped_bundle(state, job):
    """Load the bundle shipped in assets/bundles for the loaded model (job "load_bundle")."""
    from veloxcore.bundle import load_bit_plan

    _require_model(state)
    rotations, directory = _shipped_rotations(state)
    job.check()
    job.commit = lambda: setattr(state, "rotations", rotations)
    summary = rotation_summary(rotations, state, source=_shipped_name(directory))
    summary["bit_plan"] = load_bit_plan(directory)
    job.emit({"stage": "done", "log": f"Loaded the bundle shipped for {state.info.name}: "
                                      f"{_shipped_name(directory)}"})
    return summary
