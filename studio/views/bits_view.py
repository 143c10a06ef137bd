"""Bits view: choose a bit budget and see where water-filling spends it.

Keys are water-filled at a target average, or (water-filling off) get
SpectralQuant's signal/noise split: ``signal bits`` on each head's dimensions
above its spectral gap, ``noise bits`` on the rest. Values are water-filled
(uniform without water-filling) in their eigenbasis, or coded with mlx's affine
group quantisation (no spectral plan, no prediction: the benchmarks' best).

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
DEFAULT_SIGNAL, DEFAULT_NOISE = 4, 1  # SpectralQuant's split (KVCacheConfig's defaults)
# How values are coded: in their eigenbasis as planned here, or affine (bits, group).
VALUE_CODES = [("spectral", "spectral (water-filled)", None),
               ("affine4", "affine 4-bit, group 64", (4, 64)),
               ("affine3", "affine 3-bit, group 64", (3, 64))]
MEMORY_TOOLTIP = (
    "Compressed KV cache at N tokens:\n"
    "  N × layers × KV heads × (Σ key bits + Σ value bits) / 8 bytes\n"
    "plus these per-token overheads:\n"
    "  • each spectrally coded key and value vector's codes are packed into whole\n"
    "    32-bit words, so a head's Σ bits is rounded up to a multiple of 32\n"
    "    (≤ 4 bytes per vector);\n"
    "  • affine values: an fp16 scale and bias per group of G dims\n"
    "    (4 × head_dim / G bytes per vector: 4.5 bits/elem at 4 bits, G = 64);\n"
    "  • the first {sinks} tokens (attention sinks) stay exact in fp16;\n"
    "  • with a per-token scale, 2 bytes (fp16) per spectrally coded key and value\n"
    "    vector (affine values have their group scales instead).\n"
    "Not per token, so not counted: rotations, means and per-dimension scales ({fixed}).\n"
    "fp16 reference: N × layers × KV heads × head_dim × 2 (K and V) × 2 bytes."
)


def to_db(d: float) -> float:
    """dB of a relative MSE; NaN (no prediction: affine values) stays NaN."""
    if math.isnan(d):
        return math.nan
    return 10 * math.log10(d) if d > 0 else -300.0


def format_distortion(d: float) -> str:
    if math.isnan(d):
        return "— (no spectral prediction)"
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
                                    "head_dim) bits per head). Off: keys get signal bits "
                                    "above each head's spectral gap and noise bits below it "
                                    "(SpectralQuant); spectral values get round(value target) "
                                    "bits on every dimension.")
        self.signal_spin = QSpinBox()
        self.signal_spin.setRange(0, 8)
        self.signal_spin.setValue(DEFAULT_SIGNAL)
        self.signal_spin.setToolTip("Bits of each key dimension above the head's spectral gap "
                                    "(the leading, high-variance components)")
        self.noise_spin = QSpinBox()
        self.noise_spin.setRange(0, 8)
        self.noise_spin.setValue(DEFAULT_NOISE)
        self.noise_spin.setToolTip("Bits of each key dimension below the gap (0 drops it)")
        self.split_row = QWidget()
        split = QHBoxLayout(self.split_row)
        split.setContentsMargins(0, 0, 0, 0)
        split.addWidget(self.signal_spin)
        split.addWidget(QLabel("above the gap,"))
        split.addWidget(self.noise_spin)
        split.addWidget(QLabel("below"))
        split.addStretch(1)
        self.split_row.setToolTip("Keys without water-filling: SpectralQuant's signal/noise "
                                  "split at each KV head's spectral gap (largest eigenvalue "
                                  "drop within 99 % of the energy; the Spectrum view's gap)")
        self.values_combo = QComboBox()
        for data, text, _ in VALUE_CODES:
            self.values_combo.addItem(text, data)
        self.values_combo.setToolTip(
            "How values are coded. Spectral: in their eigenbasis with the bits planned here. "
            "Affine: mlx's group-wise affine quantisation (per group of 64 dims an fp16 scale "
            "and bias; 4.5 bits/elem at 4 bits), as the measured best configurations and the "
            "chat's default (spectral:wf3/a4g64+qm+ad+x1.5+vh+la) do; the value target is "
            "then unused and there is no spectral prediction.")
        form.addRow("Keys", self._row(self.key_slider, self.key_label))
        form.addRow("", self.water_check)
        form.addRow("Signal/noise", self.split_row)
        form.addRow("", self.separate_check)
        form.addRow("Values", self._row(self.value_slider, self.value_label))
        form.addRow("Value codes", self.values_combo)
        form.addRow("Range", range_row)
        self.budget_form = form

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
        self.water_check.toggled.connect(self._on_targets)
        self.signal_spin.valueChanged.connect(lambda _: self.schedule())
        self.noise_spin.valueChanged.connect(lambda _: self.schedule())
        self.values_combo.currentIndexChanged.connect(self._on_targets)
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

    @property
    def water_filling(self) -> bool:
        return self.water_check.isChecked()

    def value_affine(self) -> tuple[int, int] | None:
        """(bits, group size) when values are affine-coded, else None (spectral)."""
        return VALUE_CODES[max(0, self.values_combo.currentIndex())][2]

    def fixed(self, part: str) -> bool:
        """Whether the part's bits ignore targets and overrides: signal/noise keys
        (water-filling off) or affine values."""
        return (not self.water_filling) if part == "keys" else self.value_affine() is not None

    def key_target(self) -> float:
        """The key slider's target (water-filling; signal/noise keys do not use it)."""
        return self.key_slider.value() * STEP

    def value_target(self) -> float:
        """Spectral values' target: the key target unless separate (always separate
        without water-filling, where the key slider is unused)."""
        separate = self.separate_check.isChecked() or not self.water_filling
        return (self.value_slider.value() if separate else self.key_slider.value()) * STEP

    def set_key_target(self, bits: float) -> None:
        self.key_slider.setValue(int(round(bits / STEP)))

    def global_target(self, part: str) -> float:
        return self.key_target() if part == "keys" else self.value_target()

    def planning_target(self, part: str, layer: int) -> float:
        """The average bits a layer is planned at: its override or the global target,
        within range (unused by signal/noise keys and affine values)."""
        target = self.overrides.get((part, layer), self.global_target(part))
        return float(np.clip(target, self.min_spin.value(), self.max_spin.value()))

    def layer_target(self, part: str, layer: int) -> float:
        """The average bits per dimension a layer gets (code bits; the plan's mean for
        signal/noise keys and the code width for affine values)."""
        if self.fixed(part) and part in self.plan:
            return float(self.plan[part][0][layer].mean())
        return self.planning_target(part, layer)

    def part_average(self, part: str) -> float:
        """Code bits per dimension over all layers and heads of the current plan."""
        if self.fixed(part) and part in self.plan:
            return float(self.plan[part][0].mean())
        return self.global_target(part)

    def _on_targets(self, *_args) -> None:
        water, affine = self.water_filling, self.value_affine()
        separate = self.separate_check.isChecked()
        self.key_slider.setEnabled(water)
        self.separate_check.setEnabled(water and affine is None)
        self.value_slider.setEnabled(affine is None and (separate or not water))
        self.budget_form.setRowVisible(self.split_row, not water)
        self.values_combo.setItemText(0, "spectral (water-filled)" if water
                                      else "spectral (uniform)")
        self.token_scale_check.setText("Per-token scale (+2 B per key vector)"
                                       if affine is not None
                                       else "Per-token scale (+2 B per K/V vector)")
        if water and not separate:
            self.value_slider.blockSignals(True)
            self.value_slider.setValue(self.key_slider.value())
            self.value_slider.blockSignals(False)
        self.key_label.setText(f"{self.key_target():.2f} bits/dim" if water
                               else "signal/noise")
        if affine is not None:
            self.value_label.setText("affine")
        elif water:
            self.value_label.setText(f"{self.value_target():.2f} bits/dim")
        else:  # uniform: round(target) on every dimension
            self.value_label.setText(f"{self._uniform_bits(self.value_target())} bits/dim")
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
    def _uniform_bits(self, target: float) -> int:
        return int(np.clip(np.floor(target + 0.5), self.min_spin.value(), self.max_spin.value()))

    def _layer_plan(self, part: str, layer: int, target: float):
        """(bits (heads, dims), predicted distortion (heads,)) of one layer and part."""
        key = self._cache_key(part, layer, target)
        hit = self._cache.get(key)
        if hit is None:
            lam = self.eigenvalues(part)[layer]
            affine = self.value_affine()
            if part == "values" and affine is not None:
                # Affine codes live in the channel basis: no per-dimension plan, no
                # high-rate prediction (NaN); the bars show the code width.
                hit = (np.full(lam.shape, affine[0], dtype=np.int64),
                       np.full(lam.shape[:-1], np.nan))
            else:
                if part == "keys" and not self.water_filling:
                    bits = self.engine.signal_noise_bits(lam, self.signal_spin.value(),
                                                         self.noise_spin.value())
                else:
                    bits = self.engine.plan_bits(lam, target, self.min_spin.value(),
                                                 self.max_spin.value(), self.water_filling)
                hit = (bits, self.engine.predicted_distortion(lam, bits))
            self._cache[key] = hit
        return hit

    def _cache_key(self, part: str, layer: int, target: float) -> tuple:
        if part == "keys" and not self.water_filling:
            return (part, layer, "signal/noise", self.signal_spin.value(),
                    self.noise_spin.value())
        if part == "values" and self.value_affine() is not None:
            return (part, layer, "affine", self.value_affine())
        return (part, layer, round(target, 6), self.min_spin.value(), self.max_spin.value(),
                self.water_filling)

    def _warm_signature(self) -> tuple:
        """What the warm-up queue depends on (range, mode, value coding)."""
        return (self.min_spin.value(), self.max_spin.value(), self.water_filling,
                self.value_affine())

    def warm_cache(self) -> None:
        """Queue every slider position's plan (nearest to the current targets first)."""
        self._warm_queue = []
        if self.summary is None or not self.water_filling:
            self._warm_timer.stop()
            return
        steps = [i * STEP for i in range(int(MIN_TARGET / STEP), int(MAX_TARGET / STEP) + 1)]
        steps = [t for t in steps if self.min_spin.value() <= t <= self.max_spin.value()]
        order = []
        for part in ("keys", "values"):
            if self.fixed(part):
                continue
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
        if self._warm_key != self._warm_signature():  # range or mode changed
            self._warm_key = self._warm_signature()
            self.warm_cache()
        for part in ("keys", "values"):
            plans = [self._layer_plan(part, layer, self.planning_target(part, layer))
                     for layer in range(self.summary["num_layers"])]
            self.plan[part] = (np.stack([b for b, _ in plans]), np.stack([d for _, d in plans]))
        self.water_line.setBounds((self.min_spin.value(), self.max_spin.value()))
        self._update_readouts()
        self._draw_selected()
        self._draw_layers()
        self._update_measured()
        self.planChanged.emit()

    def bit_plan(self) -> dict:
        """The plan in veloxcore's bit_plan.json format (per-layer targets honour overrides).

        Without water-filling it records ``signal_bits`` / ``noise_bits`` and the keys'
        resulting average; with affine values ``value_method: "affine"``,
        ``value_bits`` and ``value_group_size`` (the per-dimension "values" lists are
        then the code width, which the cache ignores, and carry no distortion)."""
        if self._timer.isActive() or not self.plan:
            self.recompute()
        affine = self.value_affine()
        layers = []
        for layer in range(self.summary["num_layers"]):
            entry = {"layer": layer}
            for part in ("keys", "values"):
                bits, distortion = self.plan[part][0][layer], self.plan[part][1][layer]
                entry[part] = bits.astype(int).tolist()
                if not (part == "values" and affine is not None):
                    entry[f"{part}_distortion"] = [float(d) for d in distortion]
                entry[f"{part}_avg_bits"] = self.layer_target(part, layer)
            layers.append(entry)
        overrides = {part: {str(layer): bits for (p, layer), bits in sorted(self.overrides.items())
                            if p == part} for part in ("keys", "values")}
        plan = {"key_avg_bits": round(self.part_average("keys"), 4),
                "value_avg_bits": round(self.part_average("values"), 4),
                "min_bits": self.min_spin.value(), "max_bits": self.max_spin.value(),
                "water_filling": self.water_filling}
        if not self.water_filling:
            plan.update(signal_bits=self.signal_spin.value(), noise_bits=self.noise_spin.value())
        plan["value_method"] = "spectral" if affine is None else "affine"
        if affine is not None:
            plan.update(value_bits=affine[0], value_group_size=affine[1])
        plan.update(token_scale=self.token_scale_check.isChecked(), overrides=overrides,
                    layers=layers)
        return plan

    def apply_plan(self, plan: dict) -> None:
        """Adopt a loaded bundle's plan: range, targets, mode, value coding, token scale
        and per-layer targets."""
        widgets = (self.key_slider, self.value_slider, self.separate_check, self.min_spin,
                   self.max_spin, self.water_check, self.signal_spin, self.noise_spin,
                   self.values_combo, self.token_scale_check)
        for w in widgets:
            w.blockSignals(True)
        try:
            self.min_spin.setValue(int(plan.get("min_bits", 1)))
            self.max_spin.setValue(int(plan.get("max_bits", 8)))
            water = bool(plan.get("water_filling", True))
            self.water_check.setChecked(water)
            self.signal_spin.setValue(int(plan.get("signal_bits", DEFAULT_SIGNAL)))
            self.noise_spin.setValue(int(plan.get("noise_bits", DEFAULT_NOISE)))
            affine = plan.get("value_method") == "affine"
            code = next((i for i, (_, _, c) in enumerate(VALUE_CODES)
                         if c == (int(plan.get("value_bits", 4)),
                                  int(plan.get("value_group_size", 64)))), None)
            self.values_combo.setCurrentIndex(code if affine and code is not None else 0)
            key, value = float(plan["key_avg_bits"]), float(plan["value_avg_bits"])
            if water:  # signal/noise keys record their average, not a slider position
                self.key_slider.setValue(int(round(key / STEP)))
            if not affine:  # affine values record their code width
                self.separate_check.setChecked(not water or abs(key - value) > 1e-9)
                self.value_slider.setValue(int(round(value / STEP)))
            if "token_scale" in plan:
                self.token_scale_check.setChecked(bool(plan["token_scale"]))
        finally:
            for w in widgets:
                w.blockSignals(False)
        self.overrides.clear()
        dim = self.summary["head_dim"]
        for part in ("keys", "values"):
            if self.fixed(part):  # per-layer averages are not targets: use the record
                for layer, bits in plan.get("overrides", {}).get(part, {}).items():
                    self.overrides[(part, int(layer))] = float(bits)
                continue
            for entry in plan.get("layers", []):
                target = entry.get(f"{part}_avg_bits")
                if target is None and entry.get(part):
                    target = float(np.mean(np.sum(entry[part], axis=-1))) / dim
                if target is not None and abs(target - self.global_target(part)) > 1e-9:
                    self.overrides[(part, int(entry["layer"]))] = float(target)
        self._on_targets()
        self.engine.log.emit(f"Bits: adopted the bundle's plan ({self.key_target():.2f} / "
                             f"{self.value_target():.2f} bits, {len(self.overrides)} overrides)")

    # ---- readouts ---------------------------------------------------------
    def memory(self, tokens: int, uncoded: int = 0) -> dict:
        """Bytes of the compressed cache at ``tokens`` vs fp16 (see MEMORY_TOOLTIP);
        ``uncoded``: tokens after the sinks still held exact (a cache codes decoded
        tokens in batches, ``append_batch``; a chat reply reports how many are waiting)."""
        s = self.summary
        layers, heads, dim, sinks = (s["num_layers"], s["num_kv_heads"], s["head_dim"],
                                     s["sink_tokens"])
        exact = min(tokens, sinks) + min(uncoded, max(0, tokens - sinks))
        compressed = tokens - exact
        affine = self.value_affine()
        raw_bits = 0  # Σ over layers and heads of key bits + value bits, per token
        padded_bytes = 0  # per token, codes in whole uint32 words
        for part in ("keys", "values"):
            sums = self.plan[part][0].sum(axis=-1)  # (layers, heads)
            raw_bits += int(sums.sum())
            if part == "values" and affine is not None:  # bits × dim / 8 bytes (mlx packs)
                padded_bytes += int(sums.sum()) // 8
                continue
            # Heads share the widest word count (at least one word).
            words = np.maximum(1, np.ceil(sums.max(axis=1) / WORD_BITS))
            padded_bytes += int((words * 4 * heads).sum())
        raw = compressed * raw_bits / 8
        padding = compressed * padded_bytes - raw
        # fp16 scale + bias per group of each affine value vector.
        group_scales = (compressed * layers * heads * 2 * 2 * (dim // affine[1])
                        if affine is not None else 0)
        scaled_parts = 1 if affine is not None else 2  # per-token scales: spectral parts only
        token_scales = (compressed * layers * heads * 2 * scaled_parts
                        if self.token_scale_check.isChecked() else 0)
        sink_bytes = exact * layers * heads * dim * 2 * 2
        fp16 = tokens * layers * heads * dim * 2 * 2
        total = raw + padding + group_scales + token_scales + sink_bytes
        coded_parts = 1 if affine is not None else 2  # rotations, means, scales
        fixed = layers * heads * coded_parts * (dim * dim + 2 * dim) * 4
        return {"total": total, "raw": raw, "padding": padding, "group_scales": group_scales,
                "token_scales": token_scales, "sinks": sink_bytes, "fp16": fp16,
                "fixed": fixed, "bits_per_token": raw_bits,
                "bits_per_element": 16 * total / fp16 if fp16 else 0.0}

    def _update_memory(self) -> None:
        if self.summary is None or not self.plan:
            return
        m = self.memory(self.tokens_spin.value())
        ratio = m["fp16"] / m["total"] if m["total"] else float("inf")
        self.memory_label.setText(f"<b>{format_bytes(m['total'])}</b> vs fp16 "
                                  f"{format_bytes(m['fp16'])} (<b>{ratio:.1f}×</b> smaller)")
        scales = (f" + token scales {format_bytes(m['token_scales'])}"
                  if m["token_scales"] else "")
        groups = (f" + affine value scales/biases {format_bytes(m['group_scales'])}"
                  if m["group_scales"] else "")
        self.memory_detail.setText(
            f"codes {format_bytes(m['raw'])} + word padding {format_bytes(m['padding'])}"
            f"{groups}{scales} + {self.summary['sink_tokens']} fp16 sink tokens "
            f"{format_bytes(m['sinks'])} · {m['bits_per_element']:.2f} bits/elem")
        tip = MEMORY_TOOLTIP.format(sinks=self.summary["sink_tokens"],
                                    fixed=format_bytes(m["fixed"]))
        self.memory_label.setToolTip(tip)
        self.memory_detail.setToolTip(tip)

    def _update_readouts(self) -> None:
        for part, label in (("keys", self.key_error), ("values", self.value_error)):
            label.setText(format_distortion(float(self.plan[part][1].mean())))
        affine = self.value_affine()
        if affine is not None:
            self.value_error.setText(f"affine {affine[0]}-bit, group {affine[1]}: no "
                                     "spectral prediction")
        if not self.water_filling:
            self.key_label.setText(f"{self.part_average('keys'):.2f} bits/dim avg")
        self._update_memory()
        self._update_overrides_label()

    def active_overrides(self) -> dict[tuple[str, int], float]:
        """The overrides the plan uses (none for signal/noise keys or affine values)."""
        return {k: v for k, v in self.overrides.items() if not self.fixed(k[0])}

    def _update_overrides_label(self) -> None:
        if not self.overrides:
            self.overrides_label.setText("No per-layer overrides. Drag the water level to set "
                                         "one for the selected layer.")
        else:
            items = ", ".join(f"{'K' if part == 'keys' else 'V'}{layer} = {bits:.2f}"
                              for (part, layer), bits in sorted(self.overrides.items(),
                                                                key=lambda kv: kv[0][::-1]))
            idle = sorted({part for part, _ in self.overrides if self.fixed(part)})
            why = {"keys": "key overrides need water-filling",
                   "values": "value overrides need spectral values"}
            note = f" (unused: {'; '.join(why[p] for p in idle)})" if idle else ""
            self.overrides_label.setText(f"Overrides (bits/dim): {items}{note}")
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
        fixed = self.fixed(part)
        if preview is None or fixed:
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
        top_bits = max(self.max_spin.value(), int(bits.max()) if bits.size else 0)
        self.bits_item.setYRange(0, top_bits + 0.6, padding=0)
        self.water_line.setMovable(not fixed)
        self.water_line.setBounds((None, None) if fixed
                                  else (self.min_spin.value(), self.max_spin.value()))
        affine = self.value_affine() if part == "values" else None
        if fixed:  # the line marks the head's average; nothing to drag
            level = float(bits[head].mean())
            self.water_line.setValue(level)
            self.water_line.label.setFormat(
                f"affine {affine[0]}-bit, group {affine[1]}" if affine is not None
                else f"average {level:.2f} bits/dim")
        else:
            level = target if self.water_filling else float(self._uniform_bits(target))
            if not self.water_line.moving:
                self.water_line.setValue(level)
            overridden = (part, layer) in self.overrides or preview is not None
            self.water_line.label.setFormat(f"water level {level:.2f} bits/dim"
                                            + (" (layer override)" if overridden else ""))
        # Two short lines: a long title would widen the plot past the view.
        if affine is not None:
            head_line = (f"affine {affine[0]}-bit codes, fp16 scale + bias per {affine[1]} "
                         f"channels ({affine[0] + 32 / affine[1]:g} bits/elem)")
            legend = ("bars: code bits per channel (not in the eigenbasis: no prediction) · "
                      "line: eigenvalue")
        else:
            head_line = (f"<b>{int(bits[head].sum())}</b> bits ({bits[head].sum() / dims:.2f}"
                         f"/dim), predicted <b>{format_distortion(float(distortion[head]))}</b>")
            legend = "bars: bits per spectral dimension · line: eigenvalue (right axis)"
            if part == "keys" and not self.water_filling:
                gap = int(self._gap(part, layer)[head])
                legend = (f"bars: signal {self.signal_spin.value()} bits on the {gap} "
                          f"dim{'s' if gap != 1 else ''} above the gap, noise "
                          f"{self.noise_spin.value()} below · line: eigenvalue")
        self.bits_item.setTitle(
            f"{PART_LABELS[part]} · layer {layer} · head {head}: {head_line}"
            f"<br><span style='color:#606060'>{legend}</span>", size="10pt")
        self._sync_twin()

    def _gap(self, part: str, layer: int) -> np.ndarray:
        """Signal dimensions per KV head of one layer (the spectral gap)."""
        return self.engine.spectral_gap(self.eigenvalues(part)[layer])

    def _draw_layers(self) -> None:
        layers = np.arange(self.summary["num_layers"])
        for part, curve in self.layer_curves.items():
            if part == "values" and self.value_affine() is not None:
                curve.setData([], [])  # no prediction for affine values
            else:
                curve.setData(layers, [to_db(d) for d in self.plan[part][1].mean(axis=1)])
        marks = [(layer, to_db(float(self.plan[part][1][layer].mean())))
                 for (part, layer) in self.active_overrides()]
        self.override_marks.setData([m[0] for m in marks], [m[1] for m in marks])
        self.layer_item.setXRange(-0.8, layers[-1] + 0.8, padding=0)
        layer = self.layer_spin.value()
        self.layer_band.setRegion((layer - 0.5, layer + 0.5))

    # ---- water line ----------------------------------------------------------
    def _snap(self, value: float) -> float:
        snapped = round(value / STEP) * STEP
        return float(np.clip(snapped, self.min_spin.value(), self.max_spin.value()))

    def _on_water_dragged(self, line) -> None:
        if not self.fixed(self.part):
            self._draw_selected(preview=self._snap(line.value()))

    def _on_water_released(self, line) -> None:
        if self.summary is None or self.fixed(self.part):
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
        """What a measurement depends on: targets, range, mode, signal/noise bits, value
        coding, overrides, token scale."""
        return (self.key_target(), self.value_target(), self.min_spin.value(),
                self.max_spin.value(), self.water_filling, self.signal_spin.value(),
                self.noise_spin.value(), self.value_affine(),
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
            if math.isnan(predicted):  # affine values: nothing was predicted
                errors.append(f"{PART_LABELS[part].lower()} (affine) measured "
                              f"<b>{to_db(measured):.1f} dB</b>")
                continue
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

