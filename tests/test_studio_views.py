"""Calibrate, Spectrum and Bits views on the real engine thread and the real default model.

One window and engine (with the default model loaded once) serve the whole module;
its teardown checks that the engine's QThread stops.
"""

import json
import sys

import numpy as np
import pytest
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QKeySequence
from qtwait import wait_for

from studio.engine import Engine
from studio.main_window import MainWindow

pytestmark = pytest.mark.slow

LOAD_TIMEOUT_MS = 180_000
JOB_TIMEOUT_MS = 120_000


def kind_is(kind):
    return lambda job_id, k, *rest: k == kind


@pytest.fixture(scope="module")
def studio(qapp):
    engine = Engine()
    window = MainWindow(engine)
    window.show()
    window.model_view.load("default")
    wait_for(window.model_view.modelLoaded, LOAD_TIMEOUT_MS)
    yield window, engine
    window.close()
    assert engine.shutdown(), "the engine's QThread did not stop"
    assert not engine.is_running()
    window.deleteLater()


def curve_y(curve) -> np.ndarray:
    y = curve.getData()[1]
    return np.array([]) if y is None else np.asarray(y).copy()


def test_cancel_calibration_keeps_nothing(qtbot, studio, tmp_path):
    window, engine = studio
    cal = window.calibrate_view
    before = engine._worker.state.rotations  # read after jobs end; the worker is idle
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"Sentence {i} says the {w} thing about number {i * 13 % 97}."
                               for i, w in enumerate(["red", "green", "blue"] * 200)))
    cal.set_corpus_file(str(corpus))
    cal.samples_spin.setValue(40)
    cal.seq_spin.setValue(256)
    assert window.start_action.shortcut() == QKeySequence("Ctrl+R")
    assert window.cancel_action.shortcut() == QKeySequence("Esc")
    assert not window.cancel_action.isEnabled()

    window.start_action.trigger()  # Ctrl+R: shows the Calibrate view and starts
    assert window.stack.currentWidget() is cal
    assert cal.running and not cal.start_button.isEnabled() and cal.cancel_button.isEnabled()
    assert not cal.samples_spin.isEnabled()
    wait_for(engine.jobProgress, JOB_TIMEOUT_MS,
             lambda jid, kind, ev: kind == "calibrate" and ev.get("stage") == "sample")
    window.cancel_action.trigger()  # Esc
    wait_for(engine.jobCancelled, JOB_TIMEOUT_MS, kind_is("calibrate"))

    assert not cal.running and cal.job is None
    assert cal.start_button.isEnabled() and not cal.cancel_button.isEnabled()
    assert cal.samples_spin.isEnabled() and window.start_action.isEnabled()
    assert "Cancelled" in cal.status.text()
    assert all(curve_y(c).size == 0 for c in cal.key_curves + cal.value_curves)
    assert engine._worker.state.rotations is before  # nothing new kept
    assert window.spectrum_view.summary is None and window.bits_view.summary is None
    assert "calibrate cancelled" in window.log_view.toPlainText()
    assert not window.error_dialogs


def test_calibrate_inspect_allocate_export_and_reload(qtbot, studio, tmp_path):
    window, engine = studio
    cal, spectrum, bits = window.calibrate_view, window.spectrum_view, window.bits_view
    window.show_view("Calibrate")
    cal.corpus_combo.setCurrentIndex(cal.corpus_combo.findData("bundled"))
    cal.samples_spin.setValue(2)
    cal.seq_spin.setValue(128)
    cal.layer_spin.setValue(5)
    assert cal.layer_spin.maximum() == 29

    # ---- calibrate, with the live chart receiving data while it runs ----------
    assert curve_y(cal.key_curves[0]).size == 0  # empty before the run
    drawn = []
    cal.chartUpdated.connect(lambda n: drawn.append((n, cal.running,
                                                     curve_y(cal.key_curves[0]))))
    qtbot.mouseClick(cal.start_button, Qt.MouseButton.LeftButton)
    assert cal.cancel_button.isEnabled() and not cal.start_button.isEnabled()
    summary = wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("calibrate"))[2]
    live = [y for _, running, y in drawn if running]
    assert live and all(y.size == 64 for y in live), drawn
    if len(live) > 1:  # one redraw per sample unless the GUI thread fell behind
        assert not np.allclose(live[0], live[-1])
    assert drawn[-1][0] == 2 and np.all(np.isfinite(drawn[-1][2]))
    assert not cal.running and cal.start_button.isEnabled() and cal.spectrum_button.isEnabled()
    assert "Done" in cal.status.text() and cal.progress.value() == 1000
    assert summary["key_eigenvalues"].shape == (30, 3, 64)
    assert summary["num_samples"] == 2 and summary["sequence_length"] == 128
    log = window.log_view.toPlainText()
    assert "Calibrate: 2 × 128 tokens" in log and "Calibrate: done" in log

    # ---- spectrum: 30 layers of bars, per-layer curves, gap marker, heatmap -----
    qtbot.mouseClick(cal.spectrum_button, Qt.MouseButton.LeftButton)
    assert window.stack.currentWidget() is spectrum
    assert spectrum.pages.currentIndex() == 1
    for part in ("keys", "values"):
        heights = spectrum.pr_bars[part].opts["height"]
        assert len(spectrum.pr_bars[part].opts["x"]) == 30 and len(heights) == 30
        assert np.all((np.asarray(heights) >= 1) & (np.asarray(heights) <= 64))
    spectrum.layer_spin.setValue(7)
    assert curve_y(spectrum.curves[0]).size == 64
    assert 1.5 <= spectrum.gap_lines[0].value() <= 63.5
    assert spectrum.heat_image.image.shape == (30, 64)
    spectrum.head_combo.setCurrentIndex(spectrum.head_combo.findData(spectrum.HEAD_EACH))
    assert sum(c.isVisible() for c in spectrum.curves) == 3
    spectrum.set_part("values")
    assert "Values" in spectrum.eig_item.titleLabel.text
    assert bits.layer_spin.value() == 7  # the selected layer follows across views
    # The score-weighted key spectra (+qm) the default configuration water-fills on.
    assert summary["key_metric_spectra"].shape == (30, 3, 64)
    assert spectrum.parts == ["keys", "values", "scored"]
    assert not spectrum.part_buttons["scored"].isHidden()
    spectrum.set_part("scored")
    assert "score-weighted" in spectrum.eig_item.titleLabel.text
    np.testing.assert_allclose(
        spectrum.pr_bars["scored"].opts["height"],
        engine.participation_ratio(summary["key_metric_spectra"]).mean(axis=1))
    spectrum.head_combo.setCurrentIndex(spectrum.head_combo.findData(0))
    scored7 = summary["key_metric_spectra"][7, 0]  # the plot's y axis is log10
    np.testing.assert_allclose(curve_y(spectrum.curves[0]),
                               np.log10(np.maximum(scored7, scored7.max() * 1e-10)),
                               rtol=1e-6, atol=1e-9)
    without = dict(summary, key_metric_spectra=None)  # rotations calibrated before +qm
    spectrum.set_summary(without)
    assert spectrum.part == "keys" and spectrum.part_buttons["scored"].isHidden()
    assert not spectrum.pr_bars["scored"].isVisible()
    spectrum.set_summary(summary)
    spectrum.set_part("values")

    # ---- bits: the slider moves the plan, the error and the memory readout ------
    window.show_view("Bits")
    assert bits.pages.currentIndex() == 1
    assert bits.tokens_spin.value() == 8192  # the model's context
    memory, error = bits.memory_label.text(), bits.key_error.text()
    plan_on_model_page = window.model_view.kv_plan.text()
    assert "smaller than fp16" in plan_on_model_page
    bits.set_key_target(bits.key_target() + 1.25)
    bits.recompute()
    assert bits.memory_label.text() != memory and bits.key_error.text() != error
    assert window.model_view.kv_plan.text() != plan_on_model_page
    target = bits.key_target()
    assert target == 4.25
    key_bits = bits.plan["keys"][0]
    assert key_bits.shape == (30, 3, 64)
    assert np.all(key_bits.sum(axis=-1) == round(target * 64))  # water-filling spends exactly
    assert key_bits.min() >= bits.min_spin.value() and key_bits.max() <= bits.max_spin.value()
    # More bits on larger eigenvalues: the leading dimension gets the most.
    assert np.all(key_bits[..., 0] == key_bits.max(axis=-1))
    fp16 = 8192 * 30 * 3 * 64 * 2 * 2
    m = bits.memory(8192)
    assert m["fp16"] == fp16 and 0 < m["total"] < fp16 / 2
    assert m["raw"] == (8192 - 4) * 30 * 3 * (round(4.25 * 64) + round(4.25 * 64)) / 8
    assert m["total"] == m["raw"] + m["padding"] + m["sinks"] and m["token_scales"] == 0
    memory = bits.memory_label.text()
    bits.token_scale_check.setChecked(True)
    assert bits.memory(8192)["token_scales"] == (8192 - 4) * 30 * 3 * 2 * 2
    assert bits.memory_label.text() != memory
    bits.token_scale_check.setChecked(False)

    # Separate value target.
    bits.separate_check.setChecked(True)
    bits.value_slider.setValue(8)  # 2.00 bits
    qtbot.waitUntil(lambda: bits.value_label.text() == "2.00 bits/dim", timeout=2000)
    bits.recompute()
    assert np.all(bits.plan["values"][0].sum(axis=-1) == 128)

    # Drag the water level of the selected layer: a per-layer override.
    bits.part_buttons["keys"].click()
    bits.layer_spin.setValue(3)
    assert spectrum.layer_spin.value() == 3
    bits.water_line.setValue(6.1)
    bits.water_line.sigPositionChangeFinished.emit(bits.water_line)
    assert bits.overrides == {("keys", 3): 6.0}
    assert np.all(bits.plan["keys"][0][3].sum(axis=-1) == 6 * 64)
    assert np.all(bits.plan["keys"][0][4].sum(axis=-1) == round(4.25 * 64))
    assert "K3 = 6.00" in bits.overrides_label.text()
    assert len(bits.override_marks.data) == 1

    # Water-filling off: keys get SpectralQuant's signal/noise split at each head's
    # spectral gap (the key override idles), values round(value target) everywhere.
    assert not bits.budget_form.isRowVisible(bits.split_row)
    bits.water_check.setChecked(False)
    bits.recompute()
    assert bits.budget_form.isRowVisible(bits.split_row) and not bits.key_slider.isEnabled()
    assert (bits.signal_spin.value(), bits.noise_spin.value()) == (4, 1)
    gaps = engine.spectral_gap(bits.summary["key_eigenvalues"])
    key_bits = bits.plan["keys"][0]
    for layer in range(30):
        for head in range(3):
            k = int(gaps[layer, head])
            assert 1 <= k < 64
            assert np.all(key_bits[layer, head, :k] == 4) and np.all(key_bits[layer, head, k:] == 1)
    from veloxcore.caches import KVCacheConfig, spectral_layer_bits  # numpy only

    rotations = engine._worker.state.rotations  # the worker is idle
    for layer in (0, 3, 29):  # exactly the backend's split
        want = spectral_layer_bits(rotations[layer], KVCacheConfig(signal_bits=4, noise_bits=1))
        np.testing.assert_array_equal(key_bits[layer], want[0])
    assert np.all(bits.plan["values"][0] == 2)  # the separate value target, uniform
    assert "key overrides need water-filling" in bits.overrides_label.text()
    assert "signal 4 bits on the" in bits.bits_item.titleLabel.text
    m = bits.memory(8192)
    assert m["raw"] == (8192 - 4) * (key_bits.sum() + 30 * 3 * 2 * 64) / 8
    bits.signal_spin.setValue(3)
    bits.recompute()
    assert np.all(bits.plan["keys"][0][0, 0, : int(gaps[0, 0])] == 3)
    plan = bits.bit_plan()
    assert not plan["water_filling"] and (plan["signal_bits"], plan["noise_bits"]) == (3, 1)
    assert plan["key_avg_bits"] == pytest.approx(bits.plan["keys"][0].mean(), abs=1e-4)
    bits.signal_spin.setValue(4)
    bits.water_check.setChecked(True)
    bits.recompute()
    assert np.all(bits.plan["keys"][0][3].sum(axis=-1) == 6 * 64)  # the override is back

    # Idle time warms the plan cache for every slider position: then a move is instant.
    # (Speed is a benchmark matter; here: the warmed cache serves correct plans.)
    qtbot.waitUntil(lambda: bits.cache_warm, timeout=60_000)
    bits.set_key_target(6.5)
    bits.recompute()
    assert np.all(bits.plan["keys"][0][5].sum(axis=-1) == 6.5 * 64)
    bits.set_key_target(4.25)
    bits.recompute()

    # ---- export the bundle with the plan -----------------------------------
    target_dir = tmp_path / "bundle"
    bits.export_bundle(str(target_dir))
    assert not bits.export_button.isEnabled()
    result = wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("export_bundle"))[2]
    assert result["path"] == str(target_dir.resolve())
    assert bits.export_button.isEnabled()
    plan = json.loads((target_dir / "bit_plan.json").read_text())
    manifest = json.loads((target_dir / "manifest.json").read_text())
    assert manifest["calibration"]["num_samples"] == 2
    assert plan["key_avg_bits"] == 4.25 and plan["value_avg_bits"] == 2.0
    assert plan["overrides"] == {"keys": {"3": 6.0}, "values": {}}
    assert [sum(h) for h in plan["layers"][3]["keys"]] == [384] * 3
    assert [sum(h) for h in plan["layers"][0]["values"]] == [128] * 3

    # ---- load it back: Spectrum and Bits repopulate, the plan is adopted --------
    spectrum.clear()
    bits.clear()
    bits.set_key_target(3.0)
    bits.load_bundle(str(target_dir))
    loaded = wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("load_bundle"))[2]
    assert loaded["source"] == str(target_dir) and loaded["bit_plan"]["key_avg_bits"] == 4.25
    np.testing.assert_allclose(loaded["key_eigenvalues"], summary["key_eigenvalues"], rtol=1e-6)
    assert spectrum.pages.currentIndex() == 1 and len(spectrum.pr_bars["keys"].opts["x"]) == 30
    assert "bundle" in spectrum.info.text()
    assert bits.key_target() == 4.25 and bits.value_target() == 2.0
    assert bits.overrides == {("keys", 3): 6.0}
    assert np.all(bits.plan["keys"][0][3].sum(axis=-1) == 384)
    assert not window.error_dialogs


def test_signal_noise_keys_and_affine_values_measure_chat_export_and_reload(qtbot, studio,
                                                                           tmp_path):
    window, engine = studio
    bits = window.bits_view
    if bits.summary is None:  # run on its own
        engine.load_shipped_bundle()
        wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("load_bundle"))
    window.show_view("Bits")
    bits.clear_overrides()
    bits.token_scale_check.setChecked(False)
    bits.values_combo.setCurrentIndex(bits.values_combo.findData("spectral"))
    bits.recompute()
    spectral_memory = bits.memory_label.text()

    # ---- affine 4-bit values, group 64: no value plan, no prediction, 4.5 bits ------
    bits.values_combo.setCurrentIndex(bits.values_combo.findData("affine4"))
    bits.recompute()
    assert not bits.value_slider.isEnabled() and not bits.separate_check.isEnabled()
    assert "affine 4-bit, group 64" in bits.value_error.text()
    assert "no spectral prediction" in bits.value_error.text()
    assert curve_y(bits.layer_curves["values"]).size == 0
    assert bits.memory_label.text() != spectral_memory
    bits.part_buttons["values"].click()
    assert "affine 4-bit codes" in bits.bits_item.titleLabel.text
    assert "4.5 bits/elem" in bits.bits_item.titleLabel.text
    assert not bits.water_line.movable
    bits.part_buttons["keys"].click()
    layers, heads, dim, tokens = 30, 3, 64, 8192
    coded = tokens - 4
    m = bits.memory(tokens)
    key_sums = bits.plan["keys"][0].sum(axis=-1)
    key_bytes = coded * heads * 4 * np.ceil(key_sums.max(axis=1) / 32).sum()
    value_bytes = coded * layers * heads * (4 * dim / 8 + 2 * 2 * dim / 64)  # 4.5 bits/elem
    assert value_bytes == coded * layers * heads * dim * 4.5 / 8
    assert m["group_scales"] == coded * layers * heads * 2 * 2
    assert m["total"] == pytest.approx(key_bytes + value_bytes + m["sinks"])
    bits.token_scale_check.setChecked(True)  # per-token scales on keys only
    assert bits.memory(tokens)["token_scales"] == coded * layers * heads * 2

    # ---- with signal/noise keys: Measure's real bytes are the memory model's -----
    bits.water_check.setChecked(False)
    bits.recompute()
    job = bits.measure()
    result = wait_for(engine.jobFinished, JOB_TIMEOUT_MS,
                      lambda jid, kind, r: jid == job)[2]
    spectral = result["results"][1]
    assert spectral["method"] == "spectral: plan K4/1/Va4g64+ts"
    predicted = bits.memory(result["context"])["bits_per_element"]  # the model is exact
    assert spectral["bits_per_element"] == pytest.approx(predicted, rel=1e-9)
    assert spectral["kld"] > 0 and len(result["value_mse"]) == layers
    assert all(0 < np.mean(v) < 1 for v in result["value_mse"])
    assert "values (affine) measured" in bits.measure_label.text()
    assert bits.measured_is_current()

    # ---- the chat's "Bits plan" method builds the same cache ------------------------
    job = engine.generate([{"role": "user", "content": "Say hi."}], max_tokens=4,
                          cache=window._bits_plan())
    reply = wait_for(engine.jobFinished, JOB_TIMEOUT_MS, lambda jid, kind, r: jid == job)[2]
    # The last prompt token and the decoded ones (mlx-lm runs one step ahead, so all 4)
    # wait at fp16 for a batched append.
    assert 0 < reply["kv_uncoded_tokens"] <= 5
    assert reply["bits_per_element"] == pytest.approx(
        bits.memory(reply["kv_tokens"], reply["kv_uncoded_tokens"])["bits_per_element"],
        rel=1e-9)

    # ---- export and reload: the choices travel in bit_plan.json ---------------------
    target_dir = tmp_path / "bundle"
    bits.export_bundle(str(target_dir))
    wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("export_bundle"))
    plan = json.loads((target_dir / "bit_plan.json").read_text())
    assert (plan["value_method"], plan["value_bits"], plan["value_group_size"]) == (
        "affine", 4, 64)
    assert (plan["water_filling"], plan["signal_bits"], plan["noise_bits"]) == (False, 4, 1)
    assert plan["token_scale"] is True and "values_distortion" not in plan["layers"][0]
    assert plan["layers"][0]["values"] == [[4] * dim] * heads
    expected = bits.plan["keys"][0].copy()
    bits.clear()
    bits.water_check.setChecked(True)
    bits.values_combo.setCurrentIndex(0)
    bits.token_scale_check.setChecked(False)
    bits.load_bundle(str(target_dir))
    wait_for(engine.jobFinished, JOB_TIMEOUT_MS, kind_is("load_bundle"))
    assert not bits.water_check.isChecked() and bits.values_combo.currentData() == "affine4"
    assert bits.token_scale_check.isChecked() and not bits.overrides
    np.testing.assert_array_equal(bits.plan["keys"][0], expected)
    bits.values_combo.setCurrentIndex(0)
    bits.water_check.setChecked(True)
    bits.token_scale_check.setChecked(False)
    bits.recompute()
    assert not window.error_dialogs


def test_bundle_errors_reach_the_failure_dialog(qtbot, studio, tmp_path):
    window, engine = studio
    not_a_bundle = tmp_path / "notes"
    not_a_bundle.mkdir()
    (not_a_bundle / "todo.txt").write_text("keep me")
    window.bits_view.load_bundle(str(not_a_bundle))
    message = wait_for(engine.jobFailed, JOB_TIMEOUT_MS, kind_is("load_bundle"))[2]
    assert "manifest.json" in message
    qtbot.waitUntil(lambda: len(window.error_dialogs) == 1, timeout=5_000)
    # Exporting into a non-bundle folder is refused; the user's file survives.
    engine.export_bundle(str(not_a_bundle), None)
    message = wait_for(engine.jobFailed, JOB_TIMEOUT_MS, kind_is("export_bundle"))[2]
    assert "not a rotation bundle" in message or "no rotations to export" in message
    assert (not_a_bundle / "todo.txt").read_text() == "keep me"
    assert window.bits_view.export_button.isEnabled() and window.bits_view.load_button.isEnabled()
    for box in list(window.error_dialogs):
        box.close()


def test_thousands_of_signals_and_redraws_do_not_exhaust_singleton_refcounts():
    """PySide6 6.12.0 on CPython 3.11 drops a reference to True per emit and to None per
    void Qt call; the interpreter then aborts ("bool_dealloc", "none_dealloc") after a
    few hundred emits or a few thousand redraws. pyproject.toml excludes that release;
    this guards the pin."""
    import pyqtgraph as pg

    class Emitter(QObject):
        event = Signal(object)

    emitter = Emitter()
    emitter.event.connect(lambda event: None)
    curve = pg.PlotCurveItem()
    before = sys.getrefcount(True), sys.getrefcount(None)
    for i in range(5000):
        emitter.event.emit({"stage": "sample"})
        curve.setData(np.arange(4.0), np.full(4, float(i)))
        emitter.setObjectName("emitter")
    assert sys.getrefcount(True) >= before[0] - 10
    assert sys.getrefcount(None) >= before[1] - 100
