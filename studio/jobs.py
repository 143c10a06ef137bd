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


def generate(state, job, messages: list[dict], max_tokens: int = 256):
    _require_model(state)
    text = []
    last = None
    for chunk in stream_reply(state.model, state.tokenizer, messages, max_tokens=max_tokens):
        job.check()
        text.append(chunk.text)
        last = chunk
        yield {"text": chunk.text}
    return {
        "text": "".join(text),
        "tokens": last.generation_tokens if last else 0,
        "tokens_per_s": last.generation_tps if last else 0.0,
    }


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
    """What views see of rotations: eigenvalues (layers × heads × head_dim) and the record."""
    first = rotations[0]
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
        "bit_plan": None,
    }


def _require_model(state) -> None:
    if state.model is None:
        raise veloxcore.VeloxError("no model is loaded; load one in the Model view first")
