"""Model view: load the default model, a GGUF or a model folder; show its card."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..format import format_bytes

RECENT_KEY = "model/recent"
MAX_RECENT = 8

CARD_FIELDS = [
    ("name", "Name"),
    ("architecture", "Architecture"),
    ("num_layers", "Layers"),
    ("num_heads", "Query heads"),
    ("num_kv_heads", "KV heads"),
    ("head_dim", "Head dim"),
    ("context_length", "Context"),
    ("rope", "RoPE"),
    ("weights", "Weight memory"),
    ("quantization", "Quantization"),
    ("source", "Source"),
]


class ModelView(QWidget):
    modelLoaded = Signal(dict)

    def __init__(self, engine, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.info: dict | None = None
        self._job: int | None = None
        self.setAcceptDrops(True)

        title = QLabel("<h2>Model</h2>Load a model to calibrate and compress its KV cache. "
                       "Drop a .gguf file or a model folder here.")
        title.setWordWrap(True)
        self.default_button = QPushButton("Load default model (SmolLM2-135M)")
        self.default_button.setShortcut(QKeySequence("Ctrl+D"))
        self.default_button.setToolTip("SmolLM2-135M-Instruct, Q4_1 GGUF (Ctrl+D)")
        self.gguf_button = QPushButton("Open GGUF…")
        self.gguf_button.setShortcut(QKeySequence.StandardKey.Open)
        self.folder_button = QPushButton("Open folder…")
        buttons = QHBoxLayout()
        for b in (self.default_button, self.gguf_button, self.folder_button):
            buttons.addWidget(b)
        buttons.addStretch(1)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.stage = QLabel("No model loaded.")

        card = QGroupBox("Model card")
        form = QFormLayout(card)
        self.card_labels: dict[str, QLabel] = {}
        for key, label in CARD_FIELDS:
            value = QLabel("—")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setWordWrap(True)
            self.card_labels[key] = value
            form.addRow(label, value)

        kv = QGroupBox("KV cache memory")
        kv_form = QFormLayout(kv)
        self.context_spin = QSpinBox()
        self.context_spin.setRange(1, 1 << 20)
        self.context_spin.setSingleStep(1024)
        self.context_spin.setValue(8192)
        self.context_spin.setSuffix(" tokens")
        self.kv_fp16 = QLabel("—")
        self.kv_plan = QLabel("— (calibrate or load a bundle, then see Bits)")
        self.kv_plan.setWordWrap(True)
        self.plan_memory = None  # callable(tokens) -> {"total", "fp16"} from the Bits view
        kv_form.addRow("Context", self.context_spin)
        kv_form.addRow("fp16 K+V", self.kv_fp16)
        kv_form.addRow("Current plan", self.kv_plan)

        self.recent = QListWidget()
        self.recent.setMaximumHeight(120)
        recent_box = QGroupBox("Recent models (double-click to load)")
        QVBoxLayout(recent_box).addWidget(self.recent)

        columns = QHBoxLayout()
        columns.addWidget(card, 3)
        side = QVBoxLayout()
        side.addWidget(kv)
        side.addWidget(recent_box)
        side.addStretch(1)
        columns.addLayout(side, 2)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage)
        layout.addLayout(columns, 1)

        self.default_button.clicked.connect(lambda: self.load("default"))
        self.gguf_button.clicked.connect(self.open_gguf)
        self.folder_button.clicked.connect(self.open_folder)
        self.recent.itemDoubleClicked.connect(lambda item: self.load(item.text()))
        self.context_spin.valueChanged.connect(self._update_kv)
        engine.jobProgress.connect(self._on_progress)
        engine.jobFinished.connect(self._on_finished)
        engine.jobFailed.connect(self._on_failed)
        self._refresh_recent()

    # ---- actions --------------------------------------------------------
    def load(self, source: str) -> int:
        self._set_buttons(False)
        self.progress.setValue(0)
        self.stage.setText(f"Loading {source} …")
        self._job = self.engine.load_model(source)
        return self._job

    def open_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open GGUF model", "", "GGUF (*.gguf)")
        if path:
            self.load(path)

    def open_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open mlx-lm / Hugging Face model folder")
        if path:
            self.load(path)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        urls = event.mimeData().urls()
        if urls and urls[0].isLocalFile():
            self.load(urls[0].toLocalFile())

    # ---- engine events --------------------------------------------------
    def _on_progress(self, job_id: int, kind: str, event: object) -> None:
        if kind != "load_model" or job_id != self._job:
            return
        self.progress.setValue(int(1000 * event["fraction"]))
        self.stage.setText(f"{event['stage']} …")

    def _on_finished(self, job_id: int, kind: str, info: object) -> None:
        if kind != "load_model" or job_id != self._job:
            return
        self.info = info
        self.progress.setValue(1000)
        self.stage.setText(f"Loaded {info['name']}.")
        self._set_buttons(True)
        self._show_card(info)
        self._remember(info["source"])
        self.modelLoaded.emit(info)

    def _on_failed(self, job_id: int, kind: str, message: str) -> None:
        if kind != "load_model" or job_id != self._job:
            return
        self.progress.setValue(0)
        self.stage.setText(f"Load failed: {message}")
        self._set_buttons(True)

    # ---- display ---------------------------------------------------------
    def _show_card(self, info: dict) -> None:
        values = dict(info)
        values["rope"] = (f"θ = {info['rope_theta']:g}, "
                          f"{'interleaved' if info['rope_traditional'] else 'half-split'}"
                          + (f", scaling {info['rope_scaling']}" if info["rope_scaling"] else ""))
        values["weights"] = f"{format_bytes(info['weight_bytes'])} ({info['dtype']})"
        values["context_length"] = f"{info['context_length']:,} tokens"
        for key, label in self.card_labels.items():
            label.setText(str(values.get(key, "—")))
        self.context_spin.setValue(min(self.context_spin.value(), info["context_length"] or 8192))
        self._update_kv()

    def set_plan_memory(self, memory) -> None:
        """Show the KV memory of the current bit plan (``memory(tokens)`` from the Bits view)."""
        self.plan_memory = memory
        self._update_kv()

    def _update_kv(self) -> None:
        if not self.info:
            return
        info = self.info
        tokens = self.context_spin.value()
        per_token = 2 * info["num_layers"] * info["num_kv_heads"] * info["head_dim"] * 2
        self.kv_fp16.setText(format_bytes(per_token * tokens))
        plan = self.plan_memory(tokens) if self.plan_memory is not None else None
        if not plan or not plan.get("total"):
            self.kv_plan.setText("— (calibrate or load a bundle, then see Bits)")
        else:
            self.kv_plan.setText(f"{format_bytes(plan['total'])} "
                                 f"({plan['fp16'] / plan['total']:.1f}× smaller than fp16)")

    def _set_buttons(self, enabled: bool) -> None:
        for b in (self.default_button, self.gguf_button, self.folder_button):
            b.setEnabled(enabled)

    def _remember(self, source: str) -> None:
        settings = QSettings()
        recent = [s for s in (settings.value(RECENT_KEY) or []) if s != source]
        recent.insert(0, source)
        settings.setValue(RECENT_KEY, recent[:MAX_RECENT])
        self._refresh_recent()

    def _refresh_recent(self) -> None:
        self.recent.clear()
        for source in QSettings().value(RECENT_KEY) or []:
            if source == "default" or Path(source).exists():
                self.recent.addItem(source)
