"""The main window: a sidebar of views, a log panel and engine error dialogs."""

from __future__ import annotations

import time

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QStackedWidget,
    QWidget,
)

from .views.model_view import ModelView
from .views.placeholder import PlaceholderView

SIDEBAR_STYLE = """
QListWidget#sidebar { background: #1f2430; color: #d8dee9; border: none; font-size: 14px; }
QListWidget#sidebar::item { padding: 10px 14px; }
QListWidget#sidebar::item:selected { background: #3b4252; color: white;
                                     border-left: 3px solid #88c0d0; }
"""

PLANNED_VIEWS = [
    ("Calibrate", "Run the model over calibration text and accumulate key/value covariances "
                  "per layer and KV head, with a live eigenvalue chart."),
    ("Spectrum", "Per-layer eigenvalue spectra, spectral gaps and participation ratios."),
    ("Bits", "Water-filling bit allocation with predicted error and KV memory."),
    ("Chat", "Chat through the compressed KV cache at long context."),
]


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
        self.views: dict[str, QWidget] = {"Model": self.model_view}
        for name, text in PLANNED_VIEWS:
            self.views[name] = PlaceholderView(name, text)
        for i, (name, view) in enumerate(self.views.items()):
            self.sidebar.addItem(name)
            self.stack.addWidget(view)
            action = QAction(f"Show {name}", self)
            action.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            action.triggered.connect(lambda _=False, row=i: self.sidebar.setCurrentRow(row))
            self.addAction(action)
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)
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
        engine.busyChanged.connect(lambda busy: self.busy_label.setText("Working…" if busy
                                                                        else "Idle"))
        self.model_view.modelLoaded.connect(self._on_model_loaded)
        self._restore()

    def log(self, text: str) -> None:
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def _on_model_loaded(self, info: dict) -> None:
        self.model_label.setText(f"{info['name']} — {info['num_layers']} layers, "
                                 f"{info['num_kv_heads']} KV heads × {info['head_dim']}")
        self.log(f"Loaded {info['name']} ({info['dtype']})")

    def _on_failed(self, job_id: int, kind: str, message: str) -> None:
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
