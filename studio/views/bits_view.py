"""Bits view: choose a bit budget and see where water-filling spends it.

Everything here is instant: bit plans and predicted distortion come from the
engine's numpy-only methods on the GUI thread (no model run), cached per
(part, layer, target, range, mode). A full plan is 180 water-fills (25–110 ms on
a laptop CPU), so idle time warms the cache for every slider position, nearest
first, in slices of a few milliseconds; a slider move is then a cache hit.
Exporting and loading bundles are engine jobs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ..format import format_bytes
from .spectrum_view import (
    PART_COLORS,
    PART_LABELS,
    SELECT_BRUSH,
    clicked_in_view,
    empty_page,
    legend_html,
    part_toggle,
    styled_plot,
)

STEP = 0.25  # bits per slider tick
MEASURE_CONTEXT, MEASURE_CHUNK = 256, 128  # held-out tokens a measurement runs (~6 s on CPU)
NOT_MEASURED = ("<b>Measure</b> runs this plan on held-out text against fp16 (KL, perplexity, "
                "real bits) and marks each layer's measured error (× keys, + values) on the "
                "chart above.")
MIN_TARGET, MAX_TARGET = 1.0, 8.0
DEFAULT_TARGET = 3.0
WORD_BITS = 32  # codes of one K or V vector are packed into whole uint32 words
WARM_SLICE_S = 0.008  # idle cache warming works at most this long per event-loop turn
MEMORY_TOOLTIP = (
    "Compressed KV cache at N tokens:\n"
    "  N × layers × KV heads × (Σ key bits + Σ value bits) / 8 bytes\n"
    "plus these per-token overheads:\n"
    "  • each key and value vector's codes are packed into whole 32-bit words,\n"
    "    so a head's Σ bits is rounded up to a multiple of 32 (≤ 4 bytes per vector);\n"
    "  • the first {sinks} tokens (attention sinks) stay exact in fp16;\n"
    "  • with a per-token scale, 2 bytes (fp16) per key and per value vector.\n"
    "Not per token, so not counted: rotations, means and per-dimension scales ({fixed}).\n"
    "fp16 reference: N × layers × KV heads × head_dim × 2 (K and V) × 2 bytes."
)


def to_db(d: float) -> float:
    return 10 * math.log10(d) if d > 0 else -300.0


def format_distortion(d: float) -> str:
    return f"{100 * d:#.3g} % MSE ({to_db(d):.1f} dB)"


class BitsView(QWidget):
    """Target bits, water-filling, per-layer overrides, predicted error and KV memory."""

    layerSelected = Signal(int)
    planChanged = Signal()

    def __init__(self, engine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.summary: dict | None = None
        self.default_context = 8192
        self.overrides: dict[tuple[str, int], float] = {}  # (part, layer) -> avg bits
        self.plan: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # part -> bits, distortion
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._warm_key: tuple | None = None  # (min, max, water-fill) the warm-up is for
        self._export_job: int | None = None
        self._load_job: int | None = None
        self._measure_job: int | None = None
        self._measure_plan: tuple | None = None  # plan_key() of the running measurement
        self._measure_predicted: dict | None = None  # its predictions, per part and layer
        self.measured: dict | None = None  # the last measurement, with "plan_key"

        title = QLabel("<h2>Bits</h2>Spend bits where the eigenvalues are: water-filling gives "
                       "each spectral dimension of each KV head an integer width so that the "
                       "predicted error is smallest for the average you choose.")
        title.setWordWrap(True)
        self.load_button = QPushButton("Load bundle…")
        self.load_button.setToolTip("Load a rotation bundle (and its bit plan) (Ctrl+Shift+O)")
        self.export_button = QPushButton("Export bundle…")
        self.export_button.setToolTip("Write rotations + this bit plan as a bundle (Ctrl+S)")
        self.measure_button = QPushButton("Measure")
        self.measure_button.setToolTip(
            f"Run this plan on {MEASURE_CONTEXT} tokens of held-out text (KJV Genesis) against "
            "fp16: KL, perplexity, real bits, and each layer's measured key/value error next "
            "to the prediction (a few seconds)")
        head = QHBoxLayout()
        head.addWidget(title, 1)
        head.addWidget(self.measure_button, 0, Qt.AlignmentFlag.AlignBottom)
        head.addWidget(self.load_button, 0, Qt.AlignmentFlag.AlignBottom)
        head.addWidget(self.export_button, 0, Qt.AlignmentFlag.AlignBottom)

        # ---- budget --------------------------------------------------------
        budget = QGroupBox("Budget")
        form = QFormLayout(budget)
        self.key_slider, self.key_label = self._target_slider()
        self.separate_check = QCheckBox("Separate value target")
        self.separate_check.setToolTip("Give values their own average (keys and values often "
                                       "differ in how compressible they are)")
        self.value_slider, self.value_label = self._target_slider()
        self.min_spin = QSpinBox()
        self.min_spin.setRange(0, 8)
        self.min_spin.setValue(1)
        self.min_spin.setToolTip("Fewest bits any dimension gets (0 drops a dimension)")
        self.max_spin = QSpinBox()
        self.max_spin.setRange(1, 8)
        self.max_spin.setValue(8)
        self.max_spin.setToolTip("Most bits any dimension gets")
        range_row = QHBoxLayout()
        range_row.addWidget(self.min_spin)
        range_row.addWidget(QLabel("to"))
        range_row.addWidget(self.max_spin)
        range_row.addWidget(QLabel("bits per dimension"))
        range_row.addStretch(1)
        self.water_check = QCheckBox("Water-filling")
        self.water_check.setChecked(True)
        self.water_check.setToolTip("On: bits follow the eigenvalues (exactly round(target × "
                                    "head_dim) bits per head). Off: every dimension gets "
                                    "round(target) bits.")
        form.addRow("Keys", self._row(self.key_slider, self.key_label))
        form.addRow("", self.separate_check)
        form.addRow("Values", self._row(self.value_slider, self.value_label))
        form.addRow("Range", range_row)
        form.addRow("", self.water_check)

        # ---- selection --------------------------------------------------------
        selection = QGroupBox("Selection")
        sel = QFormLayout(selection)
        self.layer_spin = QSpinBox()
        self.layer_spin.setRange(0, 0)
        self.layer_spin.setPrefix("layer ")
        self.head_combo = QComboBox()
        self.part_group, self.part_buttons = part_toggle(self)
        parts = QHBoxLayout()
        for button in self.part_buttons.values():
            parts.addWidget(button)
        parts.addStretch(1)
        self.overrides_label = QLabel("No per-layer overrides.")
        self.overrides_label.setWordWrap(True)
        self.overrides_label.setStyleSheet("color: #505050;")
        self.clear_button = QPushButton("Clear overrides")
        self.clear_button.setToolTip("Every layer back to the global targets")
        sel.addRow("Layer", self.layer_spin)
        sel.addRow("KV head", self.head_combo)
        sel.addRow("Part", parts)
        sel.addRow(self.overrides_label)
        sel.addRow(self.clear_button)

        # ---- prediction -------------------------------------------------------
        prediction = QGroupBox("Prediction")
        pred = QFormLayout(prediction)
        self.key_error = QLabel("—")
        self.value_error = QLabel("—")
        for label in (self.key_error, self.value_error):
            label.setToolTip("Σλ·4^(−b) / Σλ, the high-rate relative MSE, averaged over "
                             "layers and KV heads")
        self.tokens_spin = QSpinBox()
        self.tokens_spin.setRange(1, 1 << 24)
        self.tokens_spin.setSingleStep(1024)
        self.tokens_spin.setValue(self.default_context)
        self.tokens_spin.setSuffix(" tokens")
        self.tokens_spin.setToolTip("Context length for the memory estimate")
        self.token_scale_check = QCheckBox("Per-token scale (+2 B per K/V vector)")
        self.token_scale_check.setToolTip("The compressed cache's optional fp16 scale per "
                                          "token, head and part (KVCacheConfig.token_scale)")
        self.memory_label = QLabel("—")
        self.memory_label.setTextFormat(Qt.TextFormat.RichText)
        self.memory_detail = QLabel("")
        self.memory_detail.setStyleSheet("color: #606060;")
        self.memory_detail.setWordWrap(True)
        pred.addRow("Keys error", self.key_error)
        pred.addRow("Values error", self.value_error)
        pred.addRow("Context", self.tokens_spin)
        pred.addRow("", self.token_scale_check)
        pred.addRow("KV cache", self.memory_label)
        pred.addRow("", self.memory_detail)

        # ---- measurement (under the charts) -------------------------------------
        self.measure_progress = QProgressBar()
        self.measure_progress.setRange(0, 1000)
        self.measure_progress.setTextVisible(False)
        self.measure_progress.setMaximumHeight(6)
        self.measure_progress.hide()
        self.measure_label = QLabel(NOT_MEASURED)
        self.measure_label.setTextFormat(Qt.TextFormat.RichText)
        self.measure_label.setWordWrap(True)
        self.measure_label.setStyleSheet("QLabel { background: white; border: 1px solid "
                                         "#d8d8d8; border-radius: 3px; padding: 5px 8px; }")

        left = QVBoxLayout()
        left.addWidget(budget)
        left.addWidget(selection)
        left.addWidget(prediction)
        left.addStretch(1)
        left_widget = QWidget()
        left_widget.setLayout(left)
        left_scroll = QScrollArea()
        left_scroll.setWidget(left_widget)
        left_scroll.setWidgetResizable(True)
        left_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        left_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        left_scroll.setFixedWidth(400)

        # ---- charts ------------------------------------------------------------
        self.bits_plot = styled_plot(None, "bits", "spectral component")
        self.bits_item = self.bits_plot.getPlotItem()
        self.bits_item.showGrid(x=False, y=True, alpha=0.18)
        self.bits_bars = pg.BarGraphItem(x=[], height=[], width=0.75, pen=pg.mkPen(None),
                                         brush=PART_COLORS["keys"])
        self.bits_item.addItem(self.bits_bars)
        # Eigenvalues on a second, logarithmic y axis (right).
        self.eig_box = pg.ViewBox()
        self.bits_item.showAxis("right")
        self.bits_item.scene().addItem(self.eig_box)
        right_axis = self.bits_item.getAxis("right")
        right_axis.linkToView(self.eig_box)
        right_axis.setLogMode(True)
        right_axis.setLabel("eigenvalue λ", color="#404040", **{"font-size": "9pt"})
        self.eig_box.setXLink(self.bits_item)
        self.eig_curve = pg.PlotDataItem([], [], pen=pg.mkPen("#303030", width=2),
                                         symbol="o", symbolSize=4, symbolBrush="#303030",
                                         symbolPen=None)
        self.eig_box.addItem(self.eig_curve)
        self.bits_item.vb.sigResized.connect(self._sync_twin)
        self.water_line = pg.InfiniteLine(
            angle=0, movable=True, pen=pg.mkPen("#0a8f6a", width=2.5, style=Qt.PenStyle.DashLine),
            hoverPen=pg.mkPen("#0a8f6a", width=4), label="",
            labelOpts={"position": 0.86, "color": "#0a6a50", "fill": (255, 255, 255, 210)})
        self.water_line.setToolTip("Water level: this layer's average bits per dimension. "
                                   "Drag it to override the target for this layer.")
        self.water_line.setZValue(20)
        self.bits_item.addItem(self.water_line)

        self.layer_plot = styled_plot(
            "Error per layer, predicted: " + legend_html(("keys", "● keys"),
                                                         ("values", "■ values"))
            + " · measured: " + legend_html(("keys", "× keys"), ("values", "+ values"))
            + " · " + legend_html(("#0a8f6a", "○ override")), "relative MSE (dB)", "layer")
        self.layer_plot.setToolTip("Predicted: 10·log₁₀(Σλ·4^(−b) / Σλ), mean over KV heads.\n"
                                   "Measured (after Measure): 10·log₁₀(E‖x − x̂‖² / Σλ) of the "
                                   "real cache on held-out text.\nClick to select a layer.")
        self.layer_item = self.layer_plot.getPlotItem()
        self.layer_band = pg.LinearRegionItem((-0.5, 0.5), movable=False, brush=SELECT_BRUSH,
                                              pen=pg.mkPen(None))
        self.layer_band.setZValue(-10)
        self.layer_item.addItem(self.layer_band)
        self.layer_curves = {}
        for part, symbol in (("keys", "o"), ("values", "s")):
            curve = pg.PlotDataItem([], [], pen=pg.mkPen(PART_COLORS[part], width=1.5),
                                    symbol=symbol, symbolSize=6, symbolBrush=PART_COLORS[part],
                                    symbolPen=None)
            self.layer_item.addItem(curve)
            self.layer_curves[part] = curve
        self.override_marks = pg.ScatterPlotItem(size=14, symbol="o", brush=None,
                                                 pen=pg.mkPen("#0a8f6a", width=2))
        self.layer_item.addItem(self.override_marks)
        self.measured_marks = {}
        for part, symbol in (("keys", "x"), ("values", "+")):
            marks = pg.ScatterPlotItem(size=11, symbol=symbol, brush=PART_COLORS[part],
                                       pen=pg.mkPen(PART_COLORS[part], width=1.2))
            self.layer_item.addItem(marks)
            self.measured_marks[part] = marks
        self.layer_plot.scene().sigMouseClicked.connect(self._on_layer_click)

        charts = QVBoxLayout()
        charts.setSpacing(4)
        charts.addWidget(self.bits_plot, 3)
        charts.addWidget(self.layer_plot, 2)
        charts.addWidget(self.measure_progress)
        charts.addWidget(self.measure_label)
        content = QWidget()
        columns = QHBoxLayout(content)
        columns.setContentsMargins(0, 0, 0, 0)
        columns.addWidget(left_scroll)
        columns.addLayout(charts, 1)

        self.pages = QStackedWidget()
        self.pages.addWidget(empty_page("No spectra yet.\n\nCalibrate the model (Calibrate view, "
                                        "Ctrl+R) or load a rotation bundle (Ctrl+Shift+O)."))
        self.pages.addWidget(content)
        layout = QVBoxLayout(self)
        layout.addLayout(head)
        layout.addWidget(self.pages, 1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(30)  # coalesces slider drags; each recompute is a few ms–50 ms
        self._timer.timeout.connect(self.recompute)
        self._warm_queue: list[tuple[str, int, float]] = []
        self._warm_timer = QTimer(self)
        self._warm_timer.setInterval(0)  # runs whenever the event loop is idle
        self._warm_timer.timeout.connect(self._warm_some)

        self.key_slider.valueChanged.connect(self._on_targets)
        self.value_slider.valueChanged.connect(self._on_targets)
        self.separate_check.toggled.connect(self._on_targets)
        self.min_spin.valueChanged.connect(self._on_range)
        self.max_spin.valueChanged.connect(self._on_range)
        self.water_check.toggled.connect(lambda _: self.schedule())
        self.layer_spin.valueChanged.connect(self._on_layer)
        self.head_combo.currentIndexChanged.connect(lambda _: self._draw_selected())
        self.part_group.idClicked.connect(lambda _: self._draw_selected())
        self.clear_button.clicked.connect(self.clear_overrides)
        self.tokens_spin.valueChanged.connect(lambda _: self._update_memory())
        self.token_scale_check.toggled.connect(lambda _: self._update_memory())
        self.water_line.sigDragged.connect(self._on_water_dragged)
        self.water_line.sigPositionChangeFinished.connect(self._on_water_released)
        self.export_button.clicked.connect(lambda: self.export_bundle())
        self.load_button.clicked.connect(lambda: self.load_bundle())
        self.measure_button.clicked.connect(self._on_measure_clicked)
        self.token_scale_check.toggled.connect(lambda _: self._update_measured())
        engine.jobProgress.connect(self._on_job_progress)
        engine.jobFinished.connect(self._on_job_finished)
        engine.jobFailed.connect(self._on_job_ended)
        engine.jobCancelled.connect(self._on_job_ended)
        self._on_targets()
        self._update_buttons()

    # ---- widgets -----------------------------------------------------------
    def _target_slider(self) -> tuple[QSlider, QLabel]:
        slider = QSlider(Qt.Orientation.Horizontal)
        slider.setRange(int(MIN_TARGET / STEP), int(MAX_TARGET / STEP))
        slider.setValue(int(DEFAULT_TARGET / STEP))
        slider.setSingleStep(1)
        slider.setPageStep(4)
        slider.setTickInterval(4)
        slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        label = QLabel()
        label.setMinimumWidth(92)
        label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return slider, label

    @staticmethod
    def _row(*widgets) -> QHBoxLayout:
        row = QHBoxLayout()
        for w in widgets:
            row.addWidget(w, 1 if isinstance(w, QSlider) else 0)
        return row

    # ---- inputs --------------------------------------------------------------
    @property
    def part(self) -> str:
        return "keys" if self.part_buttons["keys"].isChecked() else "values"

    def key_target(self) -> float:
        return self.key_slider.value() * STEP

    def value_target(self) -> float:
        return (self.value_slider.value() if self.separate_check.isChecked()
                else self.key_slider.value()) * STEP

    def set_key_target(self, bits: float) -> None:
        self.key_slider.setValue(int(round(bits / STEP)))

    def global_target(self, part: str) -> float:
        return self.key_target() if part == "keys" else self.value_target()

    def layer_target(self, part: str, layer: int) -> float:
        """The average bits a layer gets: its override or the global target, within range."""
        target = self.overrides.get((part, layer), self.global_target(part))
        return float(np.clip(target, self.min_spin.value(), self.max_spin.value()))

    def _on_targets(self, *_args) -> None:
        separate = self.separate_check.isChecked()
        self.value_slider.setEnabled(separate)
        if not separate:
            self.value_slider.blockSignals(True)
            self.value_slider.setValue(self.key_slider.value())
            self.value_slider.blockSignals(False)
        self.key_label.setText(f"{self.key_target():.2f} bits/dim")
        self.value_label.setText(f"{self.value_target():.2f} bits/dim")
        self.schedule()

    def _on_range(self, *_args) -> None:
        # Keep min ≤ max whichever spin box moved.
        if self.min_spin.value() > self.max_spin.value():
            if self.sender() is self.min_spin:
                self.max_spin.setValue(self.min_spin.value())
            else:
                self.min_spin.setValue(self.max_spin.value())
        self.water_line.setBounds((self.min_spin.value(), self.max_spin.value()))
        self.schedule()

    def _on_layer(self, layer: int) -> None:
        self._draw_selected()
        self.layer_band.setRegion((layer - 0.5, layer + 0.5))
        self.layerSelected.emit(layer)

    def select_layer(self, layer: int) -> None:
        if self.summary is not None and layer != self.layer_spin.value():
            self.layer_spin.setValue(layer)

    def clear_overrides(self) -> None:
        if self.overrides:
            self.engine.log.emit(f"Bits: cleared {len(self.overrides)} per-layer override(s)")
        self.overrides.clear()
        self.schedule()

    def set_override(self, part: str, layer: int, bits: float | None) -> None:
        if bits is None or abs(bits - self.global_target(part)) < 1e-9:
            self.overrides.pop((part, layer), None)
        else:
            self.overrides[(part, layer)] = float(bits)
        self.schedule()

    # ---- data ------------------------------------------------------------------
    def set_model(self, info: dict | None) -> None:
        if info and info.get("context_length"):
            self.default_context = int(info["context_length"])
            if self.summary is None:
                self.tokens_spin.setValue(self.default_context)

    def set_summary(self, summary: dict) -> None:
        self._forget_measurement()
        self.summary = summary
        self._cache.clear()
        self._warm_key = None
        self.overrides.clear()
        layers, heads = summary["num_layers"], summary["num_kv_heads"]
        if summary.get("context_length"):
            self.default_context = int(summary["context_length"])
        self.tokens_spin.setValue(self.default_context)
        self.layer_spin.blockSignals(True)
        self.layer_spin.setRange(0, layers - 1)
        self.layer_spin.blockSignals(False)
        self.head_combo.blockSignals(True)
        self.head_combo.clear()
        for h in range(heads):
            self.head_combo.addItem(f"head {h}", h)
        self.head_combo.blockSignals(False)
        self.pages.setCurrentIndex(1)
        if summary.get("bit_plan"):
            self.apply_plan(summary["bit_plan"])
        self.recompute()
        self._update_buttons()

    def clear(self) -> None:
        self._forget_measurement()
        self.summary = None
        self.plan = {}
        self._cache.clear()
        self._warm_queue = []
        self._warm_timer.stop()
        self.overrides.clear()
        self.pages.setCurrentIndex(0)
        self._update_buttons()

    def eigenvalues(self, part: str) -> np.ndarray:
        return self.summary["key_eigenvalues" if part == "keys" else "value_eigenvalues"]

    def schedule(self) -> None:
        """Recompute the plan soon (coalesces bursts of slider events)."""
        if self.summary is not None:
            self._timer.start()

    # ---- the plan ----------------------------------------------------------
    def _layer_plan(self, part: str, layer: int, target: float):
        key = self._cache_key(part, layer, target)
        hit = self._cache.get(key)
        if hit is None:
            lam = self.eigenvalues(part)[layer]
            bits = self.engine.plan_bits(lam, target, self.min_spin.value(),
                                         self.max_spin.value(), self.water_check.isChecked())
            hit = (bits, self.engine.predicted_distortion(lam, bits))
            self._cache[key] = hit
        return hit

    def _cache_key(self, part: str, layer: int, target: float) -> tuple:
        return (part, layer, round(target, 6), self.min_spin.value(), self.max_spin.value(),
                self.water_check.isChecked())

    def warm_cache(self) -> None:
        """Queue every slider position's plan (nearest to the current targets first)."""
        self._warm_queue = []
        if self.summary is None or not self.water_check.isChecked():
            self._warm_timer.stop()
            return
        steps = [i * STEP for i in range(int(MIN_TARGET / STEP), int(MAX_TARGET / STEP) + 1)]
        steps = [t for t in steps if self.min_spin.value() <= t <= self.max_spin.value()]
        order = []
        for part in ("keys", "values"):
            current = self.global_target(part)
            order += [(abs(t - current), part, t) for t in steps]
        for _, part, target in sorted(order):
            self._warm_queue += [(part, layer, target)
                                 for layer in range(self.summary["num_layers"])]
        self._warm_queue.reverse()  # pop() from the end takes the nearest first
        self._warm_timer.start()

    def _warm_some(self) -> None:
        deadline = time.perf_counter() + WARM_SLICE_S
        while self._warm_queue and time.perf_counter() < deadline:
            part, layer, target = self._warm_queue.pop()
            self._layer_plan(part, layer, target)
        if not self._warm_queue:
            self._warm_timer.stop()

    @property
    def cache_warm(self) -> bool:
        return not self._warm_queue

    def recompute(self) -> None:
        """Bits and predicted distortion of every layer, head and part; redraw readouts."""
        self._timer.stop()
        if self.summary is None:
            return
        if self._warm_key != self._cache_key("", 0, 0)[3:]:  # range or mode changed
            self._warm_key = self._cache_key("", 0, 0)[3:]
            self.warm_cache()
        for part in ("keys", "values"):
            plans = [self._layer_plan(part, layer, self.layer_target(part, layer))
                     for layer in range(self.summary["num_layers"])]
            self.plan[part] = (np.stack([b for b, _ in plans]), np.stack([d for _, d in plans]))
        self.water_line.setBounds((self.min_spin.value(), self.max_spin.value()))
        self._update_readouts()
        self._draw_selected()
        self._draw_layers()
        self._update_measured()
        self.planChanged.emit()

    def bit_plan(self) -> dict:
        """The plan in veloxcore's bit_plan.json format (per-layer targets honour overrides)."""
        if self._timer.isActive() or not self.plan:
            self.recompute()
        layers = []
        for layer in range(self.summary["num_layers"]):
            entry = {"layer": layer}
            for part in ("keys", "values"):
                bits, distortion = self.plan[part][0][layer], self.plan[part][1][layer]
                entry[part] = bits.astype(int).tolist()
                entry[f"{part}_distortion"] = [float(d) for d in distortion]
                entry[f"{part}_avg_bits"] = self.layer_target(part, layer)
            layers.append(entry)
        overrides = {part: {str(layer): bits for (p, layer), bits in sorted(self.overrides.items())
                            if p == part} for part in ("keys", "values")}
        return {"key_avg_bits": self.key_target(), "value_avg_bits": self.value_target(),
                "min_bits": self.min_spin.value(), "max_bits": self.max_spin.value(),
                "water_filling": self.water_check.isChecked(), "overrides": overrides,
                "layers": layers}

    def apply_plan(self, plan: dict) -> None:
        """Adopt a loaded bundle's plan: range, targets, mode and per-layer targets."""
        widgets = (self.key_slider, self.value_slider, self.separate_check, self.min_spin,
                   self.max_spin, self.water_check)
        for w in widgets:
            w.blockSignals(True)
        try:
            self.min_spin.setValue(int(plan.get("min_bits", 1)))
            self.max_spin.setValue(int(plan.get("max_bits", 8)))
            key, value = float(plan["key_avg_bits"]), float(plan["value_avg_bits"])
            self.key_slider.setValue(int(round(key / STEP)))
            self.separate_check.setChecked(abs(key - value) > 1e-9)
            self.value_slider.setValue(int(round(value / STEP)))
            self.water_check.setChecked(bool(plan.get("water_filling", True)))
        finally:
            for w in widgets:
                w.blockSignals(False)
        self.overrides.clear()
        dim = self.summary["head_dim"]
        for entry in plan.get("layers", []):
            for part in ("keys", "values"):
                target = entry.get(f"{part}_avg_bits")
                if target is None and entry.get(part):
                    target = float(np.mean(np.sum(entry[part], axis=-1))) / dim
                if target is not None and abs(target - self.global_target(part)) > 1e-9:
                    self.overrides[(part, int(entry["layer"]))] = float(target)
        self._on_targets()
        self.engine.log.emit(f"Bits: adopted the bundle's plan ({self.key_target():.2f} / "
                             f"{self.value_target():.2f} bits, {len(self.overrides)} overrides)")

    # ---- readouts ---------------------------------------------------------
    def memory(self, tokens: int) -> dict:
        """Bytes of the compressed cache at ``tokens`` vs fp16 (see MEMORY_TOOLTIP)."""
        s = self.summary
        layers, heads, dim, sinks = (s["num_layers"], s["num_kv_heads"], s["head_dim"],
                                     s["sink_tokens"])
        compressed = max(0, tokens - sinks)
        exact = min(tokens, sinks)
        raw_bits = 0  # Σ over layers and heads of key bits + value bits, per token
        padded_bytes = 0
        for part in ("keys", "values"):
            sums = self.plan[part][0].sum(axis=-1)  # (layers, heads)
            raw_bits += int(sums.sum())
            words = np.ceil(sums.max(axis=1) / WORD_BITS)  # heads share the widest word count
            padded_bytes += int((words * 4 * heads).sum())
        raw = compressed * raw_bits / 8
        padding = compressed * padded_bytes - raw
        token_scales = (compressed * layers * heads * 2 * 2
                        if self.token_scale_check.isChecked() else 0)
        sink_bytes = exact * layers * heads * dim * 2 * 2
        fp16 = tokens * layers * heads * dim * 2 * 2
        total = raw + padding + token_scales + sink_bytes
        fixed = layers * heads * 2 * (dim * dim + 2 * dim) * 4  # rotations, means, scales
        return {"total": total, "raw": raw, "padding": padding, "token_scales": token_scales,
                "sinks": sink_bytes, "fp16": fp16, "fixed": fixed, "bits_per_token": raw_bits}

    def _update_memory(self) -> None:
        if self.summary is None or not self.plan:
            return
        m = self.memory(self.tokens_spin.value())
        ratio = m["fp16"] / m["total"] if m["total"] else float("inf")
        self.memory_label.setText(f"<b>{format_bytes(m['total'])}</b> vs fp16 "
                                  f"{format_bytes(m['fp16'])} (<b>{ratio:.1f}×</b> smaller)")
        scales = (f" + token scales {format_bytes(m['token_scales'])}"
                  if m["token_scales"] else "")
        self.memory_detail.setText(
            f"codes {format_bytes(m['raw'])} + word padding {format_bytes(m['padding'])}"
            f"{scales} + {self.summary['sink_tokens']} fp16 sink tokens "
            f"{format_bytes(m['sinks'])}")
        tip = MEMORY_TOOLTIP.format(sinks=self.summary["sink_tokens"],
                                    fixed=format_bytes(m["fixed"]))
        self.memory_label.setToolTip(tip)
        self.memory_detail.setToolTip(tip)

    def _update_readouts(self) -> None:
        for part, label in (("keys", self.key_error), ("values", self.value_error)):
            label.setText(format_distortion(float(self.plan[part][1].mean())))
        self._update_memory()
        self._update_overrides_label()

    def _update_overrides_label(self) -> None:
        if not self.overrides:
            self.overrides_label.setText("No per-layer overrides. Drag the water level to set "
                                         "one for the selected layer.")
        else:
            items = ", ".join(f"{'K' if part == 'keys' else 'V'}{layer} = {bits:.2f}"
                              for (part, layer), bits in sorted(self.overrides.items(),
                                                                key=lambda kv: kv[0][::-1]))
            self.overrides_label.setText(f"Overrides (bits/dim): {items}")
        self.clear_button.setEnabled(bool(self.overrides))

    # ---- drawing ------------------------------------------------------------
    def _sync_twin(self) -> None:
        self.eig_box.setGeometry(self.bits_item.vb.sceneBoundingRect())
        self.eig_box.linkedViewChanged(self.bits_item.vb, self.eig_box.XAxis)

    def _selected(self):
        head = self.head_combo.currentData()
        return self.part, self.layer_spin.value(), 0 if head is None else head

    def _draw_selected(self, preview: float | None = None) -> None:
        if self.summary is None or not self.plan:
            return
        part, layer, head = self._selected()
        lam = self.eigenvalues(part)[layer]
        if preview is None:
            bits, distortion = self.plan[part][0][layer], self.plan[part][1][layer]
            target = self.layer_target(part, layer)
        else:
            target = preview
            bits, distortion = self._layer_plan(part, layer, target)
        dims = lam.shape[-1]
        x = np.arange(1, dims + 1)
        self.bits_bars.setOpts(x=x, height=bits[head], brush=PART_COLORS[part])
        top = float(lam[head].max())
        self.eig_curve.setData(x, np.log10(np.maximum(lam[head], max(top, 1e-30) * 1e-10)))
        self.bits_item.setXRange(0.5, dims + 0.5, padding=0)
        self.bits_item.setYRange(0, self.max_spin.value() + 0.6, padding=0)
        level = (float(np.clip(np.floor(target + 0.5), self.min_spin.value(),
                               self.max_spin.value()))
                 if not self.water_check.isChecked() else target)
        if not self.water_line.moving:
            self.water_line.setValue(level)
        overridden = (part, layer) in self.overrides or preview is not None
        self.water_line.label.setFormat(f"water level {level:.2f} bits/dim"
                                        + (" (layer override)" if overridden else ""))
        self.bits_item.setTitle(
            f"{PART_LABELS[part]} · layer {layer} · head {head}: <b>{int(bits[head].sum())}</b> "
            f"bits ({bits[head].sum() / dims:.2f}/dim), predicted "
            f"<b>{format_distortion(float(distortion[head]))}</b>"
            "<br><span style='color:#606060'>bars: bits per spectral dimension · "
            "line: eigenvalue (right axis)</span>", size="10pt")
        self._sync_twin()

    def _draw_layers(self) -> None:
        layers = np.arange(self.summary["num_layers"])
        for part, curve in self.layer_curves.items():
            curve.setData(layers, [to_db(d) for d in self.plan[part][1].mean(axis=1)])
        marks = [(layer, to_db(float(self.plan[part][1][layer].mean())))
                 for (part, layer) in self.overrides]
        self.override_marks.setData([m[0] for m in marks], [m[1] for m in marks])
        self.layer_item.setXRange(-0.8, layers[-1] + 0.8, padding=0)
        layer = self.layer_spin.value()
        self.layer_band.setRegion((layer - 0.5, layer + 0.5))

    # ---- water line ----------------------------------------------------------
    def _snap(self, value: float) -> float:
        snapped = round(value / STEP) * STEP
        return float(np.clip(snapped, self.min_spin.value(), self.max_spin.value()))

    def _on_water_dragged(self, line) -> None:
        self._draw_selected(preview=self._snap(line.value()))

    def _on_water_released(self, line) -> None:
        if self.summary is None:
            return
        part, layer, _ = self._selected()
        bits = self._snap(line.value())
        line.setValue(bits)
        self.set_override(part, layer, bits)
        self.engine.log.emit(f"Bits: {PART_LABELS[part].lower()} of layer {layer} → "
                             f"{bits:.2f} bits/dim")
        self.recompute()

    def _on_layer_click(self, event) -> None:
        point = clicked_in_view(self.layer_plot, event)
        if point is not None and self.summary is not None:
            layer = int(round(point.x()))
            if 0 <= layer < self.summary["num_layers"]:
                self.layer_spin.setValue(layer)

    # ---- bundles ---------------------------------------------------------------
    def export_bundle(self, directory: str | None = None) -> int | None:
        if self.summary is None:
            return None
        if directory is None:
            directory = QFileDialog.getExistingDirectory(
                self, "Export bundle: choose an empty folder (or an existing bundle to replace)")
            if not directory:
                return None
            chosen = Path(directory)
            # A non-empty folder that is not a bundle gets the bundle as a subfolder.
            if any(chosen.iterdir()) and not (chosen / "manifest.json").exists():
                name = (self.summary.get("model_name") or "model").split("/")[-1]
                directory = str(chosen / f"{Path(name).stem}-rotations")
        self._export_job = self.engine.export_bundle(directory, self.bit_plan())
        self._update_buttons()
        return self._export_job

    def load_bundle(self, directory: str | None = None) -> int | None:
        if directory is None:
            directory = QFileDialog.getExistingDirectory(self, "Load a rotation bundle")
            if not directory:
                return None
        self._load_job = self.engine.load_bundle(directory)
        self._update_buttons()
        return self._load_job

    # ---- measuring ---------------------------------------------------------------
    def plan_key(self) -> tuple:
        """What a measurement depends on: targets, range, mode, overrides, token scale."""
        return (self.key_target(), self.value_target(), self.min_spin.value(),
                self.max_spin.value(), self.water_check.isChecked(),
                tuple(sorted(self.overrides.items())), self.token_scale_check.isChecked())

    def _forget_measurement(self) -> None:
        """New rotations: an earlier (or running) measurement no longer applies."""
        if self._measure_job is not None:
            self.engine.cancel(self._measure_job)
        self.measured = None
        self.measure_label.setText(NOT_MEASURED)
        self._update_measured()

    def measure(self, context: int = 0) -> int | None:
        """Measure the current plan against fp16 (engine job "measure")."""
        if self.summary is None or self._measure_job is not None:
            return None
        self._measure_plan = self.plan_key()
        self._measure_predicted = self.predicted_by_layer()
        self._measure_job = self.engine.measure(
            self.bit_plan(), token_scale=self.token_scale_check.isChecked(),
            context=context or MEASURE_CONTEXT, chunk=MEASURE_CHUNK)
        self.measure_progress.setValue(0)
        self.measure_progress.show()
        self.measure_label.setText("Measuring on held-out text …")
        self._update_buttons()
        return self._measure_job

    def _on_measure_clicked(self) -> None:
        if self._measure_job is not None:
            self.engine.cancel(self._measure_job)
        else:
            self.measure()

    def _on_job_progress(self, job_id: int, kind: str, event: object) -> None:
        if job_id == self._measure_job and isinstance(event, dict) and event.get("total"):
            self.measure_progress.setValue(int(1000 * event["done"] / event["total"]))

    def predicted_by_layer(self) -> dict[str, list[float]]:
        """The plan's predicted relative MSE per layer (mean over KV heads)."""
        return {part: [float(d) for d in self.plan[part][1].mean(axis=1)]
                for part in ("keys", "values")}

    def set_measured(self, result: dict, plan_key: tuple | None = None,
                     predicted: dict | None = None) -> None:
        """Keep a measurement with the plan (key) and predictions it was made for."""
        self.measured = dict(result, plan_key=plan_key or self.plan_key(),
                             predicted=predicted or self.predicted_by_layer())
        self._update_measured()

    def measured_is_current(self) -> bool:
        return self.measured is not None and self.measured["plan_key"] == self.plan_key()

    def _update_measured(self) -> None:
        if self.measured is None or self.summary is None or not self.plan:
            for marks in self.measured_marks.values():
                marks.setData([], [])
            return
        m = self.measured
        r = m["results"][-1]
        rows = [f"<b>Measured</b> on {m['context']} held-out tokens ({m['text']}) vs fp16: "
                f"<b>KL {r['kld']:.3f}</b> nats/token · ΔPPL <b>{r['delta_ppl_pct']:+.1f} %</b>"
                f" · top-1 {100 * r['top1_agreement']:.0f} % · <b>{r['bits_per_element']:.2f}"
                f"</b> bits/elem (real bytes) · {m['elapsed_s']:.1f} s"]
        errors = []
        for part, key in (("keys", "key_mse"), ("values", "value_mse")):
            measured = float(np.mean(m[key]))
            predicted = float(np.mean(m["predicted"][part]))
            ratio = f" ({measured / predicted:.1f}×)" if predicted > 0 else ""
            errors.append(f"{PART_LABELS[part].lower()} predicted {to_db(predicted):.1f} dB, "
                          f"measured <b>{to_db(measured):.1f} dB</b>{ratio}")
        rows.append("Error (mean over layers and heads): " + " · ".join(errors))
        if not self.measured_is_current():
            rows.append("<span style='color:#a04000'>Measured for an earlier plan: "
                        "Measure again.</span>")
        self.measure_label.setText("<br>".join(rows))
        layers = np.arange(len(m["key_mse"]))
        for part, key in (("keys", "key_mse"), ("values", "value_mse")):
            self.measured_marks[part].setData(
                layers, [to_db(float(np.mean(v))) for v in m[key]])
            self.measured_marks[part].setOpacity(1.0 if self.measured_is_current() else 0.35)

    def _on_job_finished(self, job_id: int, kind: str, result: object) -> None:
        if job_id == self._measure_job:
            self.set_measured(result, self._measure_plan, self._measure_predicted)
        self._on_job_ended(job_id, kind)

    def _on_job_ended(self, job_id: int, kind: str, *args) -> None:
        if job_id == self._export_job:
            self._export_job = None
        if job_id == self._load_job:
            self._load_job = None
        if job_id == self._measure_job:
            self._measure_job = None
            self.measure_progress.hide()
            if self.measured is None or self.measured["plan_key"] != self._measure_plan:
                why = f"failed: {args[0]}" if args else "cancelled"
                self.measure_label.setText(f"Measurement {why}.")
            self._update_measured()
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.export_button.setEnabled(self.summary is not None and self._export_job is None)
        self.load_button.setEnabled(self._load_job is None)
        self.measure_button.setEnabled(self.summary is not None)
        self.measure_button.setText("Cancel measuring" if self._measure_job is not None
                                    else "Measure")

