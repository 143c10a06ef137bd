"""Spectrum view: per-layer eigenvalue spectra, spectral gaps and participation ratios.

Fed with the rotation summary that a calibration or a loaded bundle returns
(eigenvalues as layers × KV heads × head_dim numpy arrays). The analysis itself
(participation ratio, spectral gap) comes from the engine's numpy-only methods.

This module also holds the plotting helpers the Calibrate and Bits views share.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

pg.setConfigOptions(antialias=True, background="w", foreground="#303030")

KEY_COLOR = "#2f6db5"
VALUE_COLOR = "#d9731c"
SCORED_COLOR = "#1b8a6b"
# "scored": keys in the score-weighted basis the default configuration codes them in (+qm).
PART_COLORS = {"keys": KEY_COLOR, "values": VALUE_COLOR, "scored": SCORED_COLOR}
PART_LABELS = {"keys": "Keys", "values": "Values", "scored": "Keys, score-weighted"}
# Per-head shades of each part's colour (up to 8 heads get distinct lines).
HEAD_SHADES = {
    "keys": ["#1f4e8c", "#2f6db5", "#5b93d6", "#8fb6e6",
             "#15365f", "#3d7fc9", "#6fa3dd", "#a9c7ec"],
    "values": ["#a4520f", "#d9731c", "#f09a4a", "#f5bd85",
               "#7a3c0a", "#e3852e", "#f2ab66", "#f8cfa2"],
    "scored": ["#0f5c47", "#1b8a6b", "#3fb08f", "#7fcfb5",
               "#0a4033", "#27a07d", "#5fc2a3", "#a3ddca"],
}
SUMMARY_KEYS = {"keys": "key_eigenvalues", "values": "value_eigenvalues",
                "scored": "key_metric_spectra"}
GAP_COLOR = "#7a2e8e"
SELECT_BRUSH = (255, 210, 80, 70)


def head_color(part: str, head: int) -> str:
    shades = HEAD_SHADES[part]
    return shades[head % len(shades)]


def styled_plot(title: str | None = None, left: str | None = None,
                bottom: str | None = None) -> pg.PlotWidget:
    """A white PlotWidget with a grid, readable axis labels and no context-menu clutter."""
    widget = pg.PlotWidget()
    widget.setMinimumHeight(180)
    item = widget.getPlotItem()
    item.showGrid(x=True, y=True, alpha=0.18)
    item.setMenuEnabled(False)
    item.hideButtons()
    if title:
        item.setTitle(title, size="10pt")
    label_style = {"font-size": "9pt"}
    if left:
        item.setLabel("left", left, **label_style)
    if bottom:
        item.setLabel("bottom", bottom, **label_style)
    return widget


def part_toggle(parent: QWidget, parts: tuple[str, ...] = ("keys", "values")
                ) -> tuple[QButtonGroup, dict[str, QPushButton]]:
    """Exclusive Keys / Values (/ …) buttons."""
    group = QButtonGroup(parent)
    group.setExclusive(True)
    buttons = {}
    for i, part in enumerate(parts):
        button = QPushButton(PART_LABELS[part])
        button.setCheckable(True)
        button.setChecked(i == 0)
        button.setStyleSheet(f"QPushButton:checked {{ background: {PART_COLORS[part]}; "
                             "color: white; border-radius: 3px; padding: 3px 10px; }")
        group.addButton(button, i)
        buttons[part] = button
    return group, buttons


def clicked_in_view(plot: pg.PlotWidget, event):
    """The view coordinates of a left click inside ``plot``'s data area, else None."""
    if event.button() != Qt.MouseButton.LeftButton:
        return None
    vb = plot.getPlotItem().vb
    pos = event.scenePos()
    if not vb.sceneBoundingRect().contains(pos):
        return None
    return vb.mapSceneToView(pos)


def legend_html(*entries: tuple[str, str]) -> str:
    """Coloured legend text for a plot title: (part or colour, text) pairs."""
    return " ".join(f"<span style='color:{PART_COLORS.get(key, key)}'>{text}</span>"
                    for key, text in entries)


def empty_page(text: str) -> QLabel:
    label = QLabel(text)
    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    label.setWordWrap(True)
    label.setStyleSheet("color: #606060; font-size: 14px;")
    return label


def describe_summary(summary: dict) -> str:
    source = summary["source"]
    where = "calibration" if source == "calibration" else f"bundle {source}"
    return (f"{summary['num_layers']} layers × {summary['num_kv_heads']} KV heads × "
            f"{summary['head_dim']} dims · keys {summary['rope_mode']}-RoPE · "
            f"{summary['num_samples']} × {summary['sequence_length']} tokens "
            f"({summary['token_count']:,} per head) of “{summary['corpus']}” · from {where}")


class SpectrumView(QWidget):
    """Eigenvalue curves of one layer, participation ratio per layer, and a heatmap."""

    layerSelected = Signal(int)
    HEAD_MEAN, HEAD_EACH = -1, -2

    def __init__(self, engine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.summary: dict | None = None
        self.participation: dict[str, np.ndarray] = {}  # part -> (layers, heads)
        self.gaps: dict[str, np.ndarray] = {}  # part -> (layers, heads)
        self.mean_gaps: dict[str, np.ndarray] = {}  # part -> (layers,) gap of the head-mean

        title = QLabel("<h2>Spectrum</h2>")
        self.info = QLabel("Run a calibration or load a bundle to see spectra.")
        self.info.setWordWrap(True)
        self.info.setStyleSheet("color: #505050;")

        self.layer_spin = QSpinBox()
        self.layer_spin.setRange(0, 0)
        self.layer_spin.setPrefix("layer ")
        self.layer_spin.setToolTip("Layer to show (or click a bar or heatmap row)")
        self.head_combo = QComboBox()
        self.head_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.head_combo.setMinimumWidth(130)
        self.head_combo.setToolTip("One KV head, every head as its own curve, or the mean")
        self.part_group, self.part_buttons = part_toggle(self, ("keys", "values", "scored"))
        self.part_buttons["scored"].setToolTip(
            "Keys as the default configuration codes them (+qm): whitened by the score-error "
            "metric (the queries' second moment averaged over relative positions) before PCA, "
            "so each component's variance is the score error it can cause. Needs rotations "
            "calibrated with this version.")
        self.part_buttons["scored"].hide()
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Layer"))
        controls.addWidget(self.layer_spin)
        controls.addSpacing(12)
        controls.addWidget(QLabel("KV head"))
        controls.addWidget(self.head_combo)
        controls.addSpacing(12)
        for button in self.part_buttons.values():
            controls.addWidget(button)
        controls.addStretch(1)
        self.readout = QLabel("")
        self.readout.setTextFormat(Qt.TextFormat.RichText)
        controls.addWidget(self.readout)

        # Eigenvalue curves of the selected layer, log y.
        self.eig_plot = styled_plot("Eigenvalues of the selected layer", "eigenvalue λ",
                                    "spectral component")
        self.eig_plot.setLogMode(x=False, y=True)
        self.eig_item = self.eig_plot.getPlotItem()
        self.legend = self.eig_item.addLegend(offset=(-10, 10), labelTextSize="8pt")
        self.curves: list[pg.PlotDataItem] = []
        self.gap_lines: list[pg.InfiniteLine] = []

        # Participation ratio per layer: keys and values side by side.
        self.pr_plot = styled_plot("", "effective dims", "layer")
        self.pr_plot.setToolTip("(Σλ)² / Σλ²: the effective number of dimensions of each "
                                "KV head's spectrum, averaged over heads")
        self.pr_item = self.pr_plot.getPlotItem()
        self.selection_band = pg.LinearRegionItem((-0.5, 0.5), movable=False,
                                                  brush=SELECT_BRUSH, pen=pg.mkPen(None))
        self.selection_band.setZValue(-10)
        self.pr_item.addItem(self.selection_band)
        self.pr_bars = {}
        for part in ("keys", "values", "scored"):
            bars = pg.BarGraphItem(x=[], height=[], width=0.38, brush=PART_COLORS[part],
                                   pen=pg.mkPen(None), name=PART_LABELS[part])
            self.pr_item.addItem(bars)
            self.pr_bars[part] = bars
        self.pr_plot.scene().sigMouseClicked.connect(self._on_pr_click)

        # Heatmap: layers × components of log10 eigenvalues (head mean).
        self.heat_plot = styled_plot("log₁₀ eigenvalue, layers × components (head mean)",
                                     "layer", "spectral component")
        self.heat_item = self.heat_plot.getPlotItem()
        self.heat_item.showGrid(x=False, y=False)
        self.heat_item.invertY(True)
        self.heat_image = pg.ImageItem(axisOrder="row-major")
        self.heat_item.addItem(self.heat_image)
        self.colorbar = pg.ColorBarItem(values=(-4, 0), colorMap="viridis", width=14,
                                        label="log₁₀ λ", interactive=False)
        self.colorbar.setImageItem(self.heat_image, insert_in=self.heat_item)
        self.heat_marker = pg.InfiniteLine(angle=0, pen=pg.mkPen("w", width=1.5,
                                                                 style=Qt.PenStyle.DashLine))
        self.heat_item.addItem(self.heat_marker)
        self.heat_plot.scene().sigMouseClicked.connect(self._on_heat_click)

        charts = QGridLayout()
        charts.addWidget(self.eig_plot, 0, 0)
        charts.addWidget(self.heat_plot, 0, 1)
        charts.addWidget(self.pr_plot, 1, 0, 1, 2)
        charts.setRowStretch(0, 3)
        charts.setRowStretch(1, 2)
        content = QWidget()
        content_layout = QVBoxLayout(content)
        content_layout.setContentsMargins(0, 0, 0, 0)
        box = QGroupBox("Selection")
        box.setLayout(controls)
        content_layout.addWidget(box)
        content_layout.addLayout(charts, 1)

        self.pages = QStackedWidget()
        self.pages.addWidget(empty_page("No spectra yet.\n\nCalibrate the model (Calibrate view, "
                                        "Ctrl+R) or load a rotation bundle (Ctrl+Shift+O)."))
        self.pages.addWidget(content)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(self.info)
        layout.addWidget(self.pages, 1)

        self.layer_spin.valueChanged.connect(self._on_layer)
        self.head_combo.currentIndexChanged.connect(lambda _: self._draw_layer())
        self.part_group.idClicked.connect(lambda _: self._draw_all())

    # ---- data -----------------------------------------------------------
    @property
    def part(self) -> str:
        return next(p for p, b in self.part_buttons.items() if b.isChecked())

    @property
    def parts(self) -> list[str]:
        """The parts this summary has (score-weighted keys need the query metric)."""
        if self.summary is None:
            return []
        return [p for p, key in SUMMARY_KEYS.items() if self.summary.get(key) is not None]

    def set_part(self, part: str) -> None:
        self.part_buttons[part].setChecked(True)
        self._draw_all()

    def eigenvalues(self, part: str | None = None) -> np.ndarray:
        return self.summary[SUMMARY_KEYS[part or self.part]]

    def set_summary(self, summary: dict) -> None:
        self.summary = summary
        heads = summary["num_kv_heads"]
        scored = "scored" in self.parts
        self.part_buttons["scored"].setVisible(scored)
        if not scored and self.part == "scored":
            self.part_buttons["keys"].setChecked(True)
        self.participation, self.gaps, self.mean_gaps = {}, {}, {}
        for part in self.parts:
            lam = self.eigenvalues(part)
            self.participation[part] = self.engine.participation_ratio(lam)
            self.gaps[part] = self.engine.spectral_gap(lam)
            self.mean_gaps[part] = self.engine.spectral_gap(lam.mean(axis=1))
        self.info.setText(describe_summary(summary))
        layer = min(self.layer_spin.value(), summary["num_layers"] - 1)
        self.layer_spin.blockSignals(True)
        self.layer_spin.setRange(0, summary["num_layers"] - 1)
        self.layer_spin.setValue(layer)
        self.layer_spin.blockSignals(False)
        self.head_combo.blockSignals(True)
        self.head_combo.clear()
        self.head_combo.addItem("mean of heads", self.HEAD_MEAN)
        self.head_combo.addItem("each head", self.HEAD_EACH)
        for h in range(heads):
            self.head_combo.addItem(f"head {h}", h)
        self.head_combo.blockSignals(False)
        self._make_curves(heads)
        self.pages.setCurrentIndex(1)
        self._draw_all()

    def clear(self) -> None:
        self.summary = None
        self.info.setText("Run a calibration or load a bundle to see spectra.")
        self.pages.setCurrentIndex(0)

    def select_layer(self, layer: int) -> None:
        if self.summary is not None and layer != self.layer_spin.value():
            self.layer_spin.setValue(layer)

    # ---- drawing --------------------------------------------------------
    def _make_curves(self, heads: int) -> None:
        for curve in self.curves:
            self.eig_item.removeItem(curve)
        for line in self.gap_lines:
            self.eig_item.removeItem(line)
        self.legend.clear()
        self.curves, self.gap_lines = [], []
        for i in range(heads):
            curve = pg.PlotDataItem([], [], symbol="o", symbolSize=3)
            self.eig_item.addItem(curve)
            self.curves.append(curve)
            line = pg.InfiniteLine(angle=90, movable=False, label="",
                                   labelOpts={"position": 0.92 - 0.09 * i, "color": GAP_COLOR,
                                              "fill": (255, 255, 255, 200)})
            self.eig_item.addItem(line)
            self.gap_lines.append(line)

    def _on_layer(self, layer: int) -> None:
        self._draw_layer()
        self._draw_selection()
        self.layerSelected.emit(layer)

    def _draw_all(self) -> None:
        if self.summary is None:
            return
        self._draw_participation()
        self._draw_heatmap()
        self._draw_layer()
        self._draw_selection()

    def _draw_layer(self) -> None:
        if self.summary is None or not self.curves:
            return
        part, layer = self.part, self.layer_spin.value()
        lam = self.eigenvalues()[layer]  # (heads, dims)
        dims = lam.shape[-1]
        x = np.arange(1, dims + 1)
        choice = self.head_combo.currentData()
        if choice is None:
            choice = self.HEAD_MEAN
        if choice == self.HEAD_MEAN:
            shown = [("mean of heads", lam.mean(axis=0), PART_COLORS[part],
                      int(self.mean_gaps[part][layer]))]
        elif choice == self.HEAD_EACH:
            shown = [(f"head {h}", lam[h], head_color(part, h), int(self.gaps[part][layer, h]))
                     for h in range(lam.shape[0])]
        else:
            shown = [(f"head {choice}", lam[choice], PART_COLORS[part],
                      int(self.gaps[part][layer, choice]))]
        single = len(shown) == 1
        self.legend.clear()
        floor = max(float(lam.max()) * 1e-10, 1e-30)
        for i, curve in enumerate(self.curves):
            line = self.gap_lines[i]
            if i >= len(shown):
                curve.setData([], [])
                curve.hide()
                line.hide()
                continue
            name, y, color, gap = shown[i]
            curve.setData(x, np.maximum(y, floor))
            curve.setPen(pg.mkPen(color, width=2))
            curve.setSymbolBrush(color)
            curve.setSymbolPen(pg.mkPen(color))
            curve.show()
            self.legend.addItem(curve, f"{name} · gap after {gap}")
            line.setPen(pg.mkPen(GAP_COLOR if single else color, width=1.5,
                                 style=Qt.PenStyle.DashLine))
            line.setValue(gap + 0.5)
            # One label is readable; with every head, the legend names the gaps instead.
            line.label.setFormat(f"spectral gap: k = {gap}" if single else "")
            line.show()
        self.eig_item.setTitle(f"{PART_LABELS[part]} eigenvalues, layer {layer}", size="10pt")
        pr = self.participation[part][layer]
        gap = int(self.mean_gaps[part][layer])
        self.readout.setText(
            f"layer {layer} {PART_LABELS[part].lower()}: participation ratio "
            f"<b>{pr.mean():.1f}</b> of {dims} dims · spectral gap after "
            f"<b>{gap}</b> component{'s' if gap != 1 else ''} (head mean)")

    def _draw_participation(self) -> None:
        layers = np.arange(self.summary["num_layers"])
        parts = self.parts
        width = 0.76 / len(parts)
        for part, bars in self.pr_bars.items():
            if part not in parts:
                bars.setOpts(x=[], height=[])
                bars.hide()
                continue
            offset = (parts.index(part) - (len(parts) - 1) / 2) * width
            bars.setOpts(x=layers + offset, height=self.participation[part].mean(axis=1),
                         width=width * 0.95)
            bars.show()
        self.pr_item.setTitle("Participation ratio per layer: " + legend_html(
            *((p, f"■ {PART_LABELS[p].lower()}") for p in parts))
            + " (click a bar to select its layer)", size="10pt")
        self.pr_item.setXRange(-0.8, layers[-1] + 0.8, padding=0)
        top = max(float(self.participation[p].mean(axis=1).max()) for p in parts)
        self.pr_item.setYRange(0, top * 1.12, padding=0)

    def _draw_heatmap(self) -> None:
        lam = self.eigenvalues().mean(axis=1)  # (layers, dims)
        top = lam.max(axis=1, keepdims=True)
        log = np.log10(np.maximum(lam, np.maximum(top, 1e-30) * 1e-10))
        self.heat_image.setImage(log, autoLevels=False)
        layers, dims = log.shape
        self.heat_image.setRect(QRectF(0.5, -0.5, dims, layers))
        low, high = float(np.percentile(log, 1)), float(log.max())
        self.colorbar.setLevels((np.floor(low * 2) / 2, np.ceil(high * 2) / 2))
        self.heat_item.setXRange(0.5, dims + 0.5, padding=0)
        self.heat_item.setYRange(-0.5, layers - 0.5, padding=0)
        self.heat_item.setTitle(f"log₁₀ {PART_LABELS[self.part].lower()} eigenvalue, layers × "
                                "components (head mean)", size="10pt")

    def _draw_selection(self) -> None:
        layer = self.layer_spin.value()
        self.selection_band.setRegion((layer - 0.5, layer + 0.5))
        self.heat_marker.setValue(layer)

    # ---- clicks -----------------------------------------------------------
    def _on_pr_click(self, event) -> None:
        point = clicked_in_view(self.pr_plot, event)
        if point is not None and self.summary is not None:
            layer = int(round(point.x()))
            if 0 <= layer < self.summary["num_layers"]:
                self.layer_spin.setValue(layer)

    def _on_heat_click(self, event) -> None:
        point = clicked_in_view(self.heat_plot, event)
        if point is not None and self.summary is not None:
            layer = int(round(point.y()))
            if 0 <= layer < self.summary["num_layers"]:
                self.layer_spin.setValue(layer)
