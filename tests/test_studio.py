"""The studio shell on the real engine thread (offscreen)."""

import subprocess
import sys
import threading

import pytest
from PySide6.QtCore import Qt

from studio.engine import Engine
from studio.main_window import MainWindow

LOAD_TIMEOUT_MS = 180_000


@pytest.fixture
def engine(qtbot):
    engine = Engine()
    yield engine
    assert engine.shutdown()
    assert not engine.is_running(), "the engine's QThread is still running"


@pytest.fixture
def window(qtbot, engine):
    window = MainWindow(engine)
    qtbot.addWidget(window)
    window.show()
    return window


def test_jobs_run_on_the_engine_thread(qtbot, engine):
    def where(state, job):
        yield {"step": 1}
        return threading.get_ident()

    with qtbot.waitSignal(engine.jobFinished, timeout=10_000) as finished:
        engine.submit("probe", where)
    assert finished.args[2] != threading.get_ident()


def test_cancel_before_run_reports_cancelled(qtbot, engine):
    import time

    def slow(state, job):
        for _ in range(200):
            job.check()
            time.sleep(0.01)
            yield {}

    with qtbot.waitSignal(engine.jobCancelled, timeout=10_000):
        job_id = engine.submit("probe", slow)
        engine.cancel(job_id)


def test_load_default_model_from_the_model_view(qtbot, window, engine):
    view = window.model_view
    progress = []
    engine.jobProgress.connect(lambda jid, kind, ev: progress.append(ev["fraction"]))
    with qtbot.waitSignal(view.modelLoaded, timeout=LOAD_TIMEOUT_MS):
        qtbot.mouseClick(view.default_button, Qt.MouseButton.LeftButton)
    assert progress and progress == sorted(progress)
    assert view.card_labels["num_layers"].text() == "30"
    assert view.card_labels["num_kv_heads"].text() == "3"
    assert "MiB" in view.kv_fp16.text()
    assert "SmolLM2" in window.model_label.text()
    assert view.recent.count() >= 1 and view.recent.item(0).text() == "default"


def test_engine_error_shows_a_dialog_and_the_engine_recovers(qtbot, window, engine, tmp_path):
    with qtbot.waitSignal(engine.jobFailed, timeout=30_000) as failed:
        window.model_view.load(str(tmp_path / "missing.gguf"))
    assert "missing.gguf" in failed.args[2]
    qtbot.waitUntil(lambda: len(window.error_dialogs) == 1, timeout=5_000)
    assert "missing.gguf" in window.error_dialogs[0].informativeText()
    assert "Load failed" in window.model_view.stage.text()
    assert window.model_view.default_button.isEnabled()
    # The same engine thread still serves the next job.
    with qtbot.waitSignal(engine.jobFinished, timeout=LOAD_TIMEOUT_MS):
        window.model_view.load("default")
    assert engine.is_running()


def test_smoke_test_command_exits_zero():
    out = subprocess.run([sys.executable, "-m", "studio.app", "--smoke-test"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "smoke test: loaded SmolLM2" in out.stdout


def test_layer_sensitivity_job_measures_keeps_and_exports(qtbot, window, engine, tmp_path):
    """Calibrate a tiny model, measure its layer sensitivity from the Calibrate view, and
    export: the bundle carries it and +la uses it."""
    from tinymodel import write_tiny_dir

    import veloxcore
    from veloxcore.caches import KVCacheBuilder, parse_method

    write_tiny_dir(tmp_path / "tiny", head_dim=64)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    with qtbot.waitSignal(engine.jobFinished, timeout=60_000):
        window.model_view.load(str(tmp_path / "tiny"))
    cal = window.calibrate_view
    assert not cal.sensitivity_button.isEnabled()  # no rotations yet
    with qtbot.waitSignal(engine.jobFinished, timeout=60_000,
                          check_params_cb=lambda jid, kind, res: kind == "calibrate"):
        engine.calibrate(corpus=str(corpus), samples=2, seq_len=64)
    assert cal.sensitivity_button.isEnabled()
    # The view measures on generated text; cancelling keeps nothing and frees the button.
    with qtbot.waitSignal(engine.jobCancelled, timeout=60_000):
        qtbot.mouseClick(cal.sensitivity_button, Qt.MouseButton.LeftButton)
        assert cal.running and not cal.sensitivity_button.isEnabled()
        cal.cancel()
    assert not cal.running and cal.sensitivity_button.isEnabled()
    assert "Cancelled" in cal.status.text()
    # Measured on the corpus file through the engine, as the view's job does.
    steps = []
    engine.jobProgress.connect(lambda jid, kind, ev: kind == "sensitivity"
                               and ev.get("stage") == "layer" and steps.append(ev["done"]))
    with qtbot.waitSignal(engine.jobFinished, timeout=120_000,
                          check_params_cb=lambda jid, kind, res: kind == "sensitivity") as done:
        engine.measure_sensitivity(corpus=str(corpus), tokens=128)
    result = done.args[2]
    assert steps == list(range(1, 2 * 4 + 1))  # two layers, four probes each
    assert len(result["keys"][2.0]) == 2 and result["tokens"] == 128
    with qtbot.waitSignal(engine.jobFinished, timeout=60_000,
                          check_params_cb=lambda jid, kind, res: kind == "export_bundle"):
        engine.export_bundle(str(tmp_path / "bundle"))
    model, _, _ = veloxcore.load(tmp_path / "tiny")
    rotations = veloxcore.load_cached_rotations(tmp_path / "bundle", model=model)
    assert rotations.layer_sensitivity.keys[2.0].tolist() == result["keys"][2.0]
    caches = KVCacheBuilder.build(model, parse_method("spectral:wf3/a4g64+la", rotations))
    assert len(caches.layer_allocation) == 2
