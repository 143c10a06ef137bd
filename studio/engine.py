"""The engine: one long-lived worker thread that does all MLX work.

MLX arrays and streams belong to the thread that made them, so every job
(load, calibrate, evaluate, generate) runs on this one thread, and the MLX
modules themselves are first imported there (``studio.jobs`` is imported lazily
by the worker). Views never touch MLX: they call the engine's methods, which
queue a job, and listen to its signals, which carry plain Python data.

A job is a function ``fn(state, job, **params)``; when it is a generator, every
value it yields is a progress event (napari's seam between computation and
thread) and its return value is the result. ``job.cancelled`` is a
``threading.Event`` the GUI thread may set at any time; jobs check it between
steps. Jobs of a *superseding* kind drop the results of earlier jobs of that kind.
A job that changes ``EngineState`` sets ``job.commit`` instead of writing the
state itself: the worker runs it only after the final cancel check, so a job
reported as cancelled never leaves anything behind.

Progress events that are dicts with a ``"log"`` entry also go to ``Engine.log``.

The few numpy-only analyses a view needs at interactive speed (bit plans,
participation ratios, spectral gaps) run synchronously on the GUI thread through
the ``Engine`` methods at the bottom; they import ``veloxcore.spectral`` lazily,
which imports no MLX.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, QThread, Signal, Slot


class Cancelled(Exception):
    """Raised inside a job when its cancel flag is set."""


@dataclass
class Job:
    id: int
    kind: str
    fn: Callable[..., Any]
    params: dict
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the worker: sends a progress event from inside a callback-style API.
    emit: Callable[[object], None] = lambda event: None
    # Set by the job: applied to the state only if the job was not cancelled.
    commit: Callable[[], None] | None = None

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()


class EngineState:
    """What the worker keeps between jobs (lives on the worker thread only)."""

    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.info = None
        self.rotations = None  # veloxcore SpectralRotations (numpy), from calibration or a bundle


class _Worker(QObject):
    started = Signal(int, str)
    progress = Signal(int, str, object)
    finished = Signal(int, str, object)
    failed = Signal(int, str, str, str)
    cancelled = Signal(int, str)

    def __init__(self) -> None:
        super().__init__()
        self.state = EngineState()

    @Slot(object)
    def run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.cancelled.emit(job.id, job.kind)
            return
        self.started.emit(job.id, job.kind)
        job.emit = lambda event: self.progress.emit(job.id, job.kind, event)
        try:
            out = job.fn(self.state, job, **job.params)
            if inspect.isgenerator(out):
                while True:
                    try:
                        event = next(out)
                    except StopIteration as stop:
                        out = stop.value
                        break
                    self.progress.emit(job.id, job.kind, event)
            job.check()
            if job.commit is not None:
                job.commit()
        except Cancelled:
            self.cancelled.emit(job.id, job.kind)
        except Exception as e:  # every failure reaches the GUI; the thread lives on
            message = str(e) if type(e).__name__ in _PLAIN_ERRORS else f"{type(e).__name__}: {e}"
            self.failed.emit(job.id, job.kind, message, traceback.format_exc())
        else:
            self.finished.emit(job.id, job.kind, out)


# Errors whose message already says everything a user needs.
_PLAIN_ERRORS = {"ModelLoadError", "VeloxError", "BundleError", "CalibrationError",
                 "CacheConfigError", "SensitivityError", "CorpusError"}


def _jobs():
    from . import jobs  # imported on the worker thread, so MLX initialises there

    return jobs


class Engine(QObject):
    """The one object views talk to. All signals arrive on the GUI thread."""

    jobStarted = Signal(int, str)
    jobProgress = Signal(int, str, object)
    jobFinished = Signal(int, str, object)
    jobFailed = Signal(int, str, str)  # id, kind, message
    jobCancelled = Signal(int, str)
    busyChanged = Signal(bool)
    log = Signal(str)

    _dispatch = Signal(object)

    SUPERSEDING = {"load_model", "measure", "estimate"}
    ROPE_MODES = ("pre", "post")
    CORPUS_KINDS = ("bundled", "generated")  # or a path to a .txt / .md / .jsonl file

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._pending: dict[int, Job] = {}
        self._latest: dict[str, int] = {}
        self._thread = QThread()
        self._thread.setObjectName("velox-engine")
        self._worker = _Worker()
        self._worker.moveToThread(self._thread)
        self._dispatch.connect(self._worker.run)
        self._worker.started.connect(self._on_started)
        self._worker.progress.connect(self._on_progress)
        self._worker.finished.connect(self._on_finished)
        self._worker.failed.connect(self._on_failed)
        self._worker.cancelled.connect(self._on_cancelled)
        self._thread.start()

    # ---- queueing -------------------------------------------------------
    def submit(self, kind: str, fn: Callable[..., Any], **params) -> int:
        job = Job(next(self._ids), kind, fn, params)
        if kind in self.SUPERSEDING and kind in self._latest:
            old = self._pending.get(self._latest[kind])
            if old is not None:
                old.cancelled.set()
        self._latest[kind] = job.id
        self._pending[job.id] = job
        if len(self._pending) == 1:
            self.busyChanged.emit(True)
        self._dispatch.emit(job)
        return job.id

    def cancel(self, job_id: int | None = None) -> None:
        """Cancel one job, or every queued and running job."""
        for jid, job in list(self._pending.items()):
            if job_id is None or jid == job_id:
                job.cancelled.set()

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def is_running(self) -> bool:
        return self._thread.isRunning()

    def shutdown(self, timeout_ms: int = 60000) -> bool:
        """Cancel everything and stop the worker thread; True when it stopped."""
        self.cancel()
        self._thread.quit()
        return self._thread.wait(timeout_ms)

    # ---- the jobs views ask for ----------------------------------------
    def load_model(self, source: str) -> int:
        self.log.emit(f"Loading model {source} …")
        return self.submit("load_model", _jobs_fn("load_model"), source=source)

    def generate(self, messages: list[dict], max_tokens: int = 256, cache=None,
                 temperature: float = 0.0) -> int:
        """Stream a chat reply (job "generate"; see ``studio.jobs.generate``).

        cache: "fp16" (or None), a method spec such as "affine4" or
        "spectral:wf3/a4g64+qm+ad+x1.5+vh+la", "spectral" (the default spectral
        configuration), or
        ``{"bit_plan": plan, "token_scale": bool, "label": str}`` for a Bits view plan
        (its ``value_method`` may say "affine", see ``measure``). Progress
        events carry text pieces; the result (and a final ``{"stage": "done"}`` event,
        sent also when the reply is stopped) carries token counts, tokens/s and the
        cache's measured bytes next to the fp16 equivalent.
        """
        return self.submit("generate", _jobs_fn("generate"), messages=messages,
                           max_tokens=max_tokens, cache=cache, temperature=temperature)

    def measure(self, bit_plan: dict, token_scale: bool = False, context: int = 256,
                chunk: int = 128) -> int:
        """KL / perplexity of a bit plan vs fp16 on the held-out text, and measured
        per-layer key/value error (job "measure"; a newer one supersedes). The plan's
        ``value_method`` ("spectral" or "affine", with ``value_bits`` and
        ``value_group_size``) says how values are coded."""
        self.log.emit(f"Measuring the bit plan on {context} held-out tokens …")
        return self.submit("measure", _jobs_fn("measure"), bit_plan=bit_plan,
                           token_scale=token_scale, context=context, chunk=chunk)

    def load_shipped_bundle(self) -> int:
        """Load the bundle that ships for the loaded model (job kind "load_bundle")."""
        self.log.emit("Loading the shipped bundle …")
        return self.submit("load_bundle", _jobs_fn("load_shipped_bundle"))

    def calibrate(self, corpus: str = "bundled", samples: int = 64, seq_len: int = 1024,
                  rope: str = "pre", seed: int = 0, progress_layer: int = 0,
                  generated_tokens: int = 512) -> int:
        """Calibrate rotations of the loaded model (job kind "calibrate").

        corpus: "bundled", "generated" (the model writes its own text first) or a
        .txt / .md / .jsonl path. Progress events: ``{"stage": ...}`` while the
        corpus is prepared, then ``{"stage": "sample", samples_done, num_samples,
        tokens_done, tokens_per_s, eta_s, layer, key_eigenvalues,
        value_eigenvalues}`` after every sample (numpy arrays, heads × head_dim).
        The result is the rotation summary (see ``studio.jobs.rotation_summary``);
        the rotations themselves stay on the worker. A cancelled run keeps nothing.
        """
        if rope not in self.ROPE_MODES:
            raise ValueError(f"rope must be one of {self.ROPE_MODES}, not {rope!r}")
        return self.submit("calibrate", _jobs_fn("calibrate"), corpus=corpus, samples=samples,
                           seq_len=seq_len, rope=rope, seed=seed, progress_layer=progress_layer,
                           generated_tokens=generated_tokens)

    def measure_sensitivity(self, corpus: str = "generated", tokens: int = 1024) -> int:
        """Measure each layer's cost of coded keys and values for the current rotations
        (job "sensitivity"; progress ``{"stage": "layer", done, total, what}``); the
        rotations keep it, so ``+la`` and exported bundles use it."""
        self.log.emit("Measuring layer sensitivity …")
        return self.submit("sensitivity", _jobs_fn("measure_sensitivity"), corpus=corpus,
                           tokens=tokens)

    def export_bundle(self, directory: str, bit_plan: dict | None = None) -> int:
        """Write the current rotations (and a bit plan) as a bundle (job "export_bundle")."""
        self.log.emit(f"Exporting bundle to {directory} …")
        return self.submit("export_bundle", _jobs_fn("export_bundle"), directory=directory,
                           bit_plan=bit_plan)

    def load_bundle(self, directory: str) -> int:
        """Load and verify a bundle against the loaded model (job "load_bundle")."""
        self.log.emit(f"Loading bundle {directory} …")
        return self.submit("load_bundle", _jobs_fn("load_bundle"), directory=directory)

    # ---- numpy-only analysis, synchronous on the caller's thread --------
    # Each takes spectra of shape (..., head_dim), descending, and maps the
    # veloxcore.spectral function over the leading axes.
    def plan_bits(self, eigenvalues, avg_bits: float, min_bits: int = 1, max_bits: int = 8,
                  water_fill: bool = True) -> np.ndarray:
        """Integer bits per dimension, same shape as ``eigenvalues``.

        water_fill: veloxcore's water-filling (exactly round(avg_bits · d) bits per
        spectrum); otherwise every dimension gets round(avg_bits) bits, clipped to
        [min_bits, max_bits] (see ``signal_noise_bits`` for SpectralQuant's split).
        Raises ValueError for an infeasible target.
        """
        from veloxcore import spectral
        from veloxcore.errors import VeloxError

        lam = np.asarray(eigenvalues, dtype=np.float64)
        if not water_fill:
            uniform = int(np.clip(np.floor(avg_bits + 0.5), min_bits, max_bits))
            return np.full(lam.shape, uniform, dtype=np.int64)
        flat = lam.reshape(-1, lam.shape[-1])
        try:
            bits = [spectral.water_fill_bits(row, avg_bits, min_bits, max_bits) for row in flat]
        except VeloxError as e:
            raise ValueError(str(e)) from None
        return np.stack(bits).reshape(lam.shape)

    def signal_noise_bits(self, eigenvalues, signal_bits: int, noise_bits: int) -> np.ndarray:
        """SpectralQuant's split, same shape as ``eigenvalues``: ``signal_bits`` on the
        leading dimensions up to each spectrum's gap (``spectral_gap``, veloxcore's
        rule), ``noise_bits`` on the rest — what ``veloxcore.caches.spectral_layer_bits``
        gives keys without water-filling."""
        lam = np.asarray(eigenvalues, dtype=np.float64)
        gaps = self.spectral_gap(lam)
        dims = np.arange(lam.shape[-1])
        return np.where(dims < gaps[..., None], int(signal_bits), int(noise_bits)).astype(np.int64)

    def predicted_distortion(self, eigenvalues, bits) -> np.ndarray:
        """Σλ·4^(−b)/Σλ per spectrum: shape ``eigenvalues.shape[:-1]``."""
        from veloxcore import spectral

        lam = np.asarray(eigenvalues, dtype=np.float64)
        b = np.broadcast_to(np.asarray(bits), lam.shape)
        flat_l, flat_b = lam.reshape(-1, lam.shape[-1]), b.reshape(-1, lam.shape[-1])
        out = [spectral.predicted_distortion(x, y) for x, y in zip(flat_l, flat_b, strict=True)]
        return np.asarray(out, dtype=np.float64).reshape(lam.shape[:-1])

    def participation_ratio(self, eigenvalues) -> np.ndarray:
        """(Σλ)²/Σλ² per spectrum: shape ``eigenvalues.shape[:-1]``."""
        from veloxcore import spectral

        lam = np.asarray(eigenvalues, dtype=np.float64)
        out = [spectral.compute_participation_ratio(x) for x in lam.reshape(-1, lam.shape[-1])]
        return np.asarray(out, dtype=np.float64).reshape(lam.shape[:-1])

    def spectral_gap(self, eigenvalues, energy: float = 0.99) -> np.ndarray:
        """Number of leading "signal" dimensions per spectrum (ints)."""
        from veloxcore import spectral

        lam = np.asarray(eigenvalues, dtype=np.float64)
        out = [spectral.compute_spectral_gap(x, energy) for x in lam.reshape(-1, lam.shape[-1])]
        return np.asarray(out, dtype=np.int64).reshape(lam.shape[:-1])

    # ---- relays (GUI thread) -------------------------------------------
    def _stale(self, job_id: int, kind: str) -> bool:
        return kind in self.SUPERSEDING and self._latest.get(kind) != job_id

    def _done(self, job_id: int) -> None:
        self._pending.pop(job_id, None)
        if not self._pending:
            self.busyChanged.emit(False)

    def _on_started(self, job_id: int, kind: str) -> None:
        if not self._stale(job_id, kind):
            self.jobStarted.emit(job_id, kind)

    def _on_progress(self, job_id: int, kind: str, event: object) -> None:
        if self._stale(job_id, kind):
            return
        if isinstance(event, dict) and event.get("log"):
            self.log.emit(str(event["log"]))
        self.jobProgress.emit(job_id, kind, event)

    def _on_finished(self, job_id: int, kind: str, result: object) -> None:
        self._done(job_id)
        if not self._stale(job_id, kind):
            self.jobFinished.emit(job_id, kind, result)

    def _on_failed(self, job_id: int, kind: str, message: str, trace: str) -> None:
        self._done(job_id)
        self.log.emit(f"{kind} failed: {message}")
        if not self._stale(job_id, kind):
            self.jobFailed.emit(job_id, kind, message)

    def _on_cancelled(self, job_id: int, kind: str) -> None:
        self._done(job_id)
        self.log.emit(f"{kind} cancelled")
        if not self._stale(job_id, kind):
            self.jobCancelled.emit(job_id, kind)


def _jobs_fn(name: str) -> Callable[..., Any]:
    """A job that resolves ``studio.jobs.<name>`` on the worker thread."""

    def run(state, job, **params):
        return (yield from _as_generator(getattr(_jobs(), name)(state, job, **params)))

    run.__name__ = name
    return run


def _as_generator(out):
    if inspect.isgenerator(out):
        return (yield from out)
    return out
