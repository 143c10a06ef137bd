"""The main window: a sidebar of views, a log panel and engine error dialogs."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QStackedWidget,
    QWidget,
)

from .views.bits_view import BitsView
from .views.calibrate_view import CalibrateView
from .views.chat_view import ChatView
from .views.model_view import ModelView
from .views.report import write_report
from .views.spectrum_view import SpectrumView

SIDEBAR_STYLE = """
QListWidget#sidebar { background: #1f2430; color: #d8dee9; border: none; font-size: 14px; }
QListWidget#sidebar::item { padding: 10px 14px; }
QListWidget#sidebar::item:selected { background: #3b4252; color: white;
                                     border-left: 3px solid #88c0d0; }
"""

# Jobs whose result is a rotation summary for the Spectrum and Bits views.
ROTATION_JOBS = ("calibrate", "load_bundle")
# Jobs whose failures their view shows inline instead of in a dialog.
INLINE_FAILURES = ("generate",)


class MainWindow(QMainWindow):
    def __init__(self, engine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.setWindowTitle("Velox Studio")
        self.resize(1200, 800)
        self.error_dialogs: list[QMessageBox] = []

        self.sidebar = QListWidget()
        self.sidebar.setObjectName("sidebar")
        self.sidebar.setFixedWidth(170)
        self.sidebar.setStyleSheet(SIDEBAR_STYLE)
        self.stack = QStackedWidget()
        self.model_view = ModelView(engine)
        self.calibrate_view = CalibrateView(engine)
        self.spectrum_view = SpectrumView(engine)
        self.bits_view = BitsView(engine)
        self.chat_view = ChatView(engine, plan_provider=self._bits_plan)
        self.views: dict[str, QWidget] = {"Model": self.model_view,
                                          "Calibrate": self.calibrate_view,
                                          "Spectrum": self.spectrum_view,
                                          "Bits": self.bits_view,
                                          "Chat": self.chat_view}
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        calibration_menu = menu.addMenu("&Calibration")
        view_menu = menu.addMenu("&View")
        for i, (name, view) in enumerate(self.views.items()):
            self.sidebar.addItem(name)
            self.stack.addWidget(view)
            action = QAction(f"Show {name}", self)
            action.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            action.triggered.connect(lambda _=False, row=i: self.sidebar.setCurrentRow(row))
            self.addAction(action)
            view_menu.addAction(action)
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)

        def add(menu_, text, shortcut, slot, tip=""):
            action = QAction(text, self)
            action.setShortcut(QKeySequence(shortcut))
            action.setStatusTip(tip)
            action.triggered.connect(slot)
            menu_.addAction(action)
            self.addAction(action)
            return action

        self.load_bundle_action = add(file_menu, "Load bundle…", "Ctrl+Shift+O",
                                      lambda: self.bits_view.load_bundle(),
                                      "Load a rotation bundle into Spectrum and Bits")
        self.shipped_bundle_action = add(file_menu, "Load shipped bundle", "",
                                         self._load_shipped_bundle,
                                         "Load the rotation bundle that ships for the loaded "
                                         "model (the default model has one)")
        self.export_bundle_action = add(file_menu, "Export bundle…", "Ctrl+S",
                                        self._export_bundle,
                                        "Write the rotations and the current bit plan")
        file_menu.addSeparator()
        self.export_report_action = add(file_menu, "Export report…", "Ctrl+E",
                                        lambda: self.export_report(),
                                        "Write a Markdown report with the charts as PNG")
        file_menu.addSeparator()
        add(file_menu, "Quit", QKeySequence.StandardKey.Quit, self.close)
        self.start_action = add(calibration_menu, "Start calibration", "Ctrl+R",
                                self._start_calibration, "Calibrate with the Calibrate view's "
                                "settings")
        self.cancel_action = add(calibration_menu, "Cancel calibration", "Esc",
                                 self.calibrate_view.cancel, "Stop after the current sample")
        self.cancel_action.setEnabled(False)
        self.calibrate_view.stateChanged.connect(self._on_calibration_state)
        self.sidebar.setCurrentRow(0)

        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        row.addWidget(self.sidebar)
        row.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        dock = QDockWidget("Log", self)
        dock.setObjectName("log-dock")
        dock.setWidget(self.log_view)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)
        self.resizeDocks([dock], [130], Qt.Orientation.Vertical)

        self.busy_label = QLabel("Idle")
        self.model_label = QLabel("No model")
        self.statusBar().addWidget(self.model_label, 1)
        self.statusBar().addPermanentWidget(self.busy_label)

        engine.log.connect(self.log)
        engine.jobFailed.connect(self._on_failed)
        engine.jobFinished.connect(self._on_job_finished)
        self.calibrate_view.showSpectrum.connect(lambda: self.show_view("Spectrum"))
        self.bits_view.planChanged.connect(
            lambda: self.model_view.set_plan_memory(self.bits_view.memory))
        self.spectrum_view.layerSelected.connect(self.bits_view.select_layer)
        self.bits_view.layerSelected.connect(self.spectrum_view.select_layer)
        engine.busyChanged.connect(lambda busy: self.busy_label.setText("Working…" if busy
                                                                        else "Idle"))
        self.model_view.modelLoaded.connect(self._on_model_loaded)
        self._restore()

    def log(self, text: str) -> None:
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def show_view(self, name: str) -> None:
        self.sidebar.setCurrentRow(list(self.views).index(name))

    def _on_model_loaded(self, info: dict) -> None:
        self.model_label.setText(f"{info['name']} — {info['num_layers']} layers, "
                                 f"{info['num_kv_heads']} KV heads × {info['head_dim']}")
        self.log(f"Loaded {info['name']} ({info['dtype']})")
        # The engine drops rotations of the previous model when a model loads.
        self.calibrate_view.set_model(info)
        self.bits_view.set_model(info)
        self.chat_view.set_model(info)
        self.spectrum_view.clear()
        self.bits_view.clear()
        self.model_view.set_plan_memory(None)

    def _on_job_finished(self, job_id: int, kind: str, result: object) -> None:
        if kind in ROTATION_JOBS:
            self.spectrum_view.set_summary(result)
            self.bits_view.set_summary(result)
            self.calibrate_view.set_rotations(result)
            if result.get("bit_plan"):
                self.chat_view.prefer_plan()
        elif kind == "generate" and isinstance(result, dict) and result.get("rotations"):
            # The chat loaded the bundle shipped for this model.
            self.spectrum_view.set_summary(result["rotations"])
            self.bits_view.set_summary(result["rotations"])
            self.calibrate_view.set_rotations(result["rotations"])
        elif kind == "export_bundle":
            self.statusBar().showMessage(f"Exported bundle to {result['path']}", 8000)

    def _start_calibration(self) -> None:
        self.show_view("Calibrate")
        if self.calibrate_view.start() is None and self.calibrate_view.model_info is None:
            self.statusBar().showMessage("Load a model first (Model view, Ctrl+D)", 5000)

    def _on_calibration_state(self, running: bool) -> None:
        self.start_action.setEnabled(not running)
        self.cancel_action.setEnabled(running)

    def _export_bundle(self) -> None:
        if self.bits_view.summary is None:
            self.statusBar().showMessage("Nothing to export: calibrate or load a bundle first",
                                         5000)
            return
        self.bits_view.export_bundle()

    def _bits_plan(self) -> dict | None:
        """The Bits view's plan as the chat's cache spec (None without rotations)."""
        bits = self.bits_view
        if bits.summary is None:
            return None
        plan = bits.bit_plan()
        scale = bits.token_scale_check.isChecked()
        # No label here: the generate job names the plan (plan_label), value method included.
        return {"bit_plan": plan, "token_scale": scale}

    def _load_shipped_bundle(self) -> None:
        if self.model_view.info is None:
            self.statusBar().showMessage("Load a model first (Model view, Ctrl+D)", 5000)
            return
        self.engine.load_shipped_bundle()

    def export_report(self, directory: str | None = None) -> Path | None:
        if directory is None:
            directory = QFileDialog.getExistingDirectory(self, "Export report: choose a folder")
            if not directory:
                return None
            chosen = Path(directory)
            if any(chosen.iterdir()) and not (chosen / "report.md").exists():
                directory = str(chosen / time.strftime("velox-report-%Y%m%d-%H%M%S"))
        try:
            path = write_report(self, directory)
        except OSError as e:
            self._on_failed(0, "export_report", str(e))
            return None
        self.log(f"Wrote the report to {path}")
        self.statusBar().showMessage(f"Wrote {path}", 8000)
        return path

    def _on_failed(self, job_id: int, kind: str, message: str) -> None:
        if kind in INLINE_FAILURES:
            return
        box = QMessageBox(QMessageBox.Icon.Critical, "Velox Studio",
                          f"{kind.replace('_', ' ').capitalize()} failed", parent=self)
        box.setInformativeText(message)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.finished.connect(lambda _=0, b=box: self.error_dialogs.remove(b)
                             if b in self.error_dialogs else None)
        self.error_dialogs.append(box)
        box.open()  # non-blocking: the app and engine keep running

    def _restore(self) -> None:
        settings = QSettings()
        if geometry := settings.value("window/geometry"):
            self.restoreGeometry(geometry)
        if state := settings.value("window/state"):
            self.restoreState(state)

    def closeEvent(self, event) -> None:  # noqa: N802
        settings = QSettings()
        settings.setValue("window/geometry", self.saveGeometry())
        settings.setValue("window/state", self.saveState())
        super().closeEvent(event)
