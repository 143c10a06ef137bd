"""Chat view: talk to the model through a compressed KV cache.

Every reply is an engine job ("generate") that streams text pieces; the view
only stores them, and a 15 Hz timer re-renders the transcript when something
changed. A finished job reports the token counts, tokens/s and the cache's
measured bytes next to the fp16 equivalent, which feed the context and KV
meters. Side-by-side mode queues two jobs for the same history (fp16, then the
selected method) and marks where the replies part. Conversations are saved as
JSON (``studio.chat_store``) after every turn and reopen from the list.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QEvent, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..chat_store import ChatStore, new_conversation, title_of
from ..format import format_bytes

REDRAW_HZ = 15
METHODS = [("fp16", "fp16 (no compression)"),
           ("affine4", "affine4 — mlx-lm style, 4.5 bits"),
           ("spectral", "spectral — SpectralQuant")]
# Spectral configurations (method specs), with what they measured at 8k tokens on the
# held-out text (BENCHMARKS.md). "plan" is the Bits view's current plan.
SPECTRAL_CONFIGS = [
    ("spectral:wf3/a4g64+qm+ad+x1.5+vh+la",
     "wf3/a4g64 + metric-weighted adaptive keys + rotated values + layer budget — 3.8 bits, "
     "KL 0.032 (default)"),
    ("spectral:wf2.75/l4+qm+ad+ec",
     "wf2.75/l4 + entropy-coded keys + lean values — 3.45 bits, KL 0.029 (best per byte; "
     "no fused attention: slow)"),
    ("spectral:wf2.5/a4g64+qm+ad+x1.5+vh+la",
     "wf2.5/a4g64 + metric-weighted adaptive keys + rotated values + layer budget — 3.5 "
     "bits, KL 0.046"),
    ("spectral:wf3.5/a4g64+qm+ad+x1.5+vh+la",
     "wf3.5/a4g64 + metric-weighted adaptive keys + rotated values + layer budget — 4.0 "
     "bits, KL 0.023"),
    ("spectral:wf3/a4g64+tf0.7+qa+ad+x1.5+vh+la",
     "wf3/a4g64 + query-aware adaptive keys + rotated values + layer budget — 3.9 bits, "
     "KL 0.041 (default before +qm)"),
    ("spectral:wf3/a4g64+tf0.7+qa+ad+x1.5+vh",
     "wf3/a4g64 + prompt-adaptive keys + rotated values — 3.9 bits, KL 0.051"),
    ("spectral:wf3/a3g64+qa+ad+x1.5+vh+r64",
     "wf3/a3g64 + prompt-adaptive keys + rotated values + 64 recent — 3.4 bits, KL 0.086"),
    ("spectral:wf3/a4g64+tf0.7+qa",
     "wf3/a4g64 + query-aware bits + token scale ≥ 0.7 — 3.9 bits, KL 0.08"),
    ("spectral:wf3/a4g64+ts+qa", "wf3/a4g64 + query-aware bits + token scale — KL 0.09"),
    ("spectral:wf3/a4g64+ts", "wf3/a4g64 + token scale — 3.9 bits, KL 0.097"),
    ("spectral:wf3/a4g64+r64", "wf3/a4g64 + 64 exact recent tokens — 3.85 bits, KL 0.085"),
    ("spectral:wf3/a4g64", "wf3/a4g64 — 3.8 bits, KL 0.094"),
    ("spectral:wf2.5/a4g64", "wf2.5/a4g64 — 3.5 bits, KL 0.15"),
    ("plan", "Bits view plan (current sliders)"),
]
USER_BG, ASSISTANT_BG, NOTICE_COLOR = "#e8eef8", "#f4f4f2", "#a03010"
DIVERGE_BG = "#ffe08a"
STREAM_CURSOR = "▍"


def divergence(reference: dict, other: dict) -> dict:
    """Where two replies part: token index (first differing piece), character
    offset (common prefix) and the start of the word it falls in."""
    a, b = reference.get("text", ""), other.get("text", "")
    pieces_a, pieces_b = reference.get("pieces") or [], other.get("pieces") or []
    if a == b:
        return {"identical": True, "token": None, "char": None, "word_char": None,
                "word": None}
    token = next((i for i, (x, y) in enumerate(zip(pieces_a, pieces_b, strict=False))
                  if x != y), min(len(pieces_a), len(pieces_b)))
    char = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))
    word_char = char
    while word_char > 0 and not a[word_char - 1].isspace():
        word_char -= 1
    word = (a[word_char:] or b[word_char:]).split()
    return {"identical": False, "token": token, "char": char, "word_char": word_char,
            "word": word[0] if word else ""}


def text_html(text: str, highlight_from: int | None = None, cursor: bool = False) -> str:
    def esc(s: str) -> str:
        return html.escape(s).replace("\n", "<br>")

    if highlight_from is None:
        body = esc(text)
    else:
        body = (esc(text[:highlight_from]) + f"<span style='background-color:{DIVERGE_BG}'>"
                + esc(text[highlight_from:]) + "</span>")
    if cursor:
        body += f"<span style='color:#2f6db5'>{STREAM_CURSOR}</span>"
    return body or "<i style='color:#888'>(empty)</i>"


def meta_text(meta: dict | None) -> str:
    if not meta:
        return ""
    parts = [f"{meta.get('tokens', 0)} tokens", f"{meta.get('tokens_per_s', 0.0):.1f} tok/s"]
    if meta.get("method") == "fp16" and meta.get("kv_fp16_bytes"):
        parts.append(f"KV {format_bytes(meta['kv_fp16_bytes'])}")
    elif meta.get("kv_fp16_bytes"):
        ratio = meta["kv_fp16_bytes"] / max(1, meta["kv_bytes"])
        parts.append(f"KV {format_bytes(meta['kv_bytes'])} vs fp16 "
                     f"{format_bytes(meta['kv_fp16_bytes'])} ({ratio:.1f}×, "
                     f"{meta.get('bits_per_element', 0):.1f} bits/elem)")
    if meta.get("prompt_tokens") is not None:
        parts.append(f"prompt {meta['prompt_tokens']} tokens")
    if meta.get("stopped"):
        parts.append("stopped")
    elif meta.get("finish_reason") == "length":
        parts.append("hit the token limit")
    return " · ".join(parts)


class ChatView(QWidget):
    """Streaming chat with method selection, meters, history and side-by-side compare."""

    turnFinished = Signal(dict)  # the assistant message of a completed or stopped turn
    turnFailed = Signal(str)
    rendered = Signal()
    historyChanged = Signal()

    def __init__(self, engine, plan_provider=None, store: ChatStore | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.engine = engine
        self.plan_provider = plan_provider or (lambda: None)
        self.store = store or ChatStore()
        self.model_info: dict | None = None
        self.conversation = new_conversation()
        self.turn: dict | None = None  # the replies in flight
        self.last_stats: dict | None = None
        self._dirty = False

        title = QLabel("<h2>Chat</h2>Talk to the model through a compressed KV cache. Replies "
                       "are greedy, so two methods answer alike until the cache's error tips a "
                       "token.")
        title.setWordWrap(True)

        # ---- history --------------------------------------------------------
        self.chat_list = QListWidget()
        self.chat_list.setWordWrap(True)
        self.chat_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.chat_list.setSpacing(2)
        self.chat_list.setToolTip("Saved conversations (click to reopen)")
        self.new_button = QPushButton("New chat")
        self.new_button.setShortcut(QKeySequence("Ctrl+N"))
        self.new_button.setToolTip("Start a new conversation (Ctrl+N)")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Delete the selected conversation's file")
        history_buttons = QHBoxLayout()
        history_buttons.addWidget(self.new_button)
        history_buttons.addWidget(self.delete_button)
        history = QWidget()
        history_layout = QVBoxLayout(history)
        history_layout.setContentsMargins(0, 0, 0, 0)
        history_layout.addWidget(QLabel("Conversations"))
        history_layout.addWidget(self.chat_list, 1)
        history_layout.addLayout(history_buttons)

        # ---- transcript + meters ---------------------------------------------
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)
        self.transcript.document().setDocumentMargin(10)
        self.notice = QLabel("")
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet(f"color: {NOTICE_COLOR}; font-weight: bold;")
        self.notice.hide()
        self.status = QLabel("Load a model to chat (Model view, Ctrl+D).")
        self.status.setStyleSheet("color: #505050;")

        meters = QGroupBox("Last reply")
        meters_layout = QGridLayout(meters)
        meters_layout.setVerticalSpacing(3)
        self.context_bar = QProgressBar()
        self.context_bar.setRange(0, 1)
        self.context_bar.setValue(0)
        self.context_bar.setToolTip("Prompt + reply tokens of the last turn vs the model's "
                                    "context window")
        self.context_label = QLabel("Context: —")
        self.kv_bar = QProgressBar()
        self.kv_bar.setRange(0, 1000)
        self.kv_bar.setValue(0)
        self.kv_bar.setToolTip("Measured bytes of the KV cache after the last reply (codes, "
                               "scales and exact tokens), as a share of the fp16 cache for "
                               "the same tokens")
        self.kv_label = QLabel("KV cache: —")
        for bar, color in ((self.context_bar, "#5b93d6"), (self.kv_bar, "#0a8f6a")):
            bar.setTextVisible(False)
            bar.setFixedHeight(8)
            bar.setStyleSheet("QProgressBar { border: 1px solid #c8c8c8; border-radius: 3px; "
                              f"background: #f2f2f2; }} QProgressBar::chunk {{ background: "
                              f"{color}; border-radius: 2px; }}")
        for label in (self.context_label, self.kv_label):
            label.setTextFormat(Qt.TextFormat.RichText)
        meters_layout.addWidget(self.context_label, 0, 0)
        meters_layout.addWidget(self.context_bar, 1, 0)
        meters_layout.addWidget(self.kv_label, 0, 1)
        meters_layout.addWidget(self.kv_bar, 1, 1)
        meters_layout.setColumnStretch(0, 1)
        meters_layout.setColumnStretch(1, 1)
        meters_layout.setHorizontalSpacing(18)

        # ---- settings ---------------------------------------------------------
        self.method_combo = QComboBox()
        for key, text in METHODS:
            self.method_combo.addItem(text, key)
        self.method_combo.setToolTip("KV cache for the next reply")
        self.spectral_combo = QComboBox()
        for key, text in SPECTRAL_CONFIGS:
            self.spectral_combo.addItem(text, key)
        self.spectral_combo.setToolTip(
            "Keys water-filled in the calibrated eigenbasis (wfK: K bits/dim on average), "
            "values affine 4-bit (a4g64). Numbers: 8k tokens of held-out text on the default "
            "model (BENCHMARKS.md). The per-token scale keeps chat-template tokens, unlike "
            "the calibration text, from clipping. Without rotations, the bundle shipped for "
            "the default model is loaded.")
        self.spectral_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.max_tokens_spin = QSpinBox()
        self.max_tokens_spin.setRange(1, 8192)
        self.max_tokens_spin.setValue(256)
        self.max_tokens_spin.setSuffix(" tokens")
        self.max_tokens_spin.setToolTip("Longest reply")
        self.compare_check = QCheckBox("Side by side with fp16")
        self.compare_check.setToolTip("Answer with fp16 and with the selected cache (two runs) "
                                      "and mark where the replies part")
        settings_row = QHBoxLayout()
        settings_row.addWidget(QLabel("Method"))
        settings_row.addWidget(self.method_combo)
        settings_row.addWidget(self.spectral_combo, 1)
        settings_row.addWidget(QLabel("Max"))
        settings_row.addWidget(self.max_tokens_spin)
        settings_row.addWidget(self.compare_check)
        self.system_edit = QLineEdit()
        self.system_edit.setPlaceholderText("System prompt (empty: the chat template's own)")
        self.system_edit.setClearButtonEnabled(True)
        system_row = QHBoxLayout()
        system_row.addWidget(QLabel("System"))
        system_row.addWidget(self.system_edit, 1)

        # ---- input ---------------------------------------------------------------
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message (Enter sends, Shift+Enter for a new line)")
        self.input.setFixedHeight(64)
        self.input.installEventFilter(self)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the reply; what is written so far is kept (Esc)")
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Answer the last message again (Ctrl+Shift+R)")
        self.regenerate_button.setShortcut(QKeySequence("Ctrl+Shift+R"))
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        row = QHBoxLayout()
        row.addWidget(self.stop_button)
        row.addWidget(self.regenerate_button)
        buttons.addLayout(row)
        input_row = QHBoxLayout()
        input_row.addWidget(self.input, 1)
        input_row.addLayout(buttons)

        chat = QWidget()
        chat_layout = QVBoxLayout(chat)
        chat_layout.setContentsMargins(0, 0, 0, 0)
        chat_layout.addWidget(self.transcript, 1)
        chat_layout.addWidget(self.notice)
        chat_layout.addWidget(self.status)
        chat_layout.addWidget(meters)
        chat_layout.addLayout(settings_row)
        chat_layout.addLayout(system_row)
        chat_layout.addLayout(input_row)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(history)
        splitter.addWidget(chat)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([220, 900])
        splitter.setChildrenCollapsible(False)
        history.setMinimumWidth(150)
        head = QHBoxLayout()
        head.addWidget(title, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(head)
        layout.addWidget(splitter, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(1000 // REDRAW_HZ)
        self._timer.timeout.connect(self._render_if_dirty)

        self.send_button.clicked.connect(lambda: self.send())
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.new_button.clicked.connect(self.new_chat)
        self.delete_button.clicked.connect(lambda: self.delete_selected())
        self.chat_list.itemClicked.connect(self._on_list_clicked)
        self.method_combo.currentIndexChanged.connect(self._on_method)
        self.spectral_combo.currentIndexChanged.connect(lambda _: self._remember_settings())
        self.compare_check.toggled.connect(lambda _: self._remember_settings())
        engine.jobProgress.connect(self._on_progress)
        engine.jobFinished.connect(self._on_finished)
        engine.jobFailed.connect(self._on_failed)
        engine.jobCancelled.connect(self._on_cancelled)

        self._restore_settings()
        self._on_method()
        self.refresh_list()
        self.render()
        self._update_buttons()

    # ---- settings ----------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.method_combo.currentData()

    def set_method(self, method: str, spectral: str | None = None) -> None:
        self.method_combo.setCurrentIndex(self.method_combo.findData(method))
        if spectral is not None:
            self.spectral_combo.setCurrentIndex(self.spectral_combo.findData(spectral))

    def prefer_plan(self) -> None:
        """A bundle with its own bit plan arrived: spectral replies use that plan."""
        self.spectral_combo.setCurrentIndex(self.spectral_combo.findData("plan"))

    def cache_spec(self):
        """What the generate job gets for the selected method (None: not available)."""
        if self.method != "spectral":
            return self.method
        choice = self.spectral_combo.currentData()
        if choice != "plan":
            return choice
        return self.plan_provider()

    def method_label(self) -> str:
        spec = self.cache_spec()
        if isinstance(spec, dict):
            return spec.get("label", "spectral: Bits view plan")
        return spec or "—"

    def _on_method(self, *_args) -> None:
        self.spectral_combo.setEnabled(self.method == "spectral")
        self._remember_settings()

    def _remember_settings(self) -> None:
        settings = QSettings()
        settings.setValue("chat/method", self.method)
        settings.setValue("chat/spectral", self.spectral_combo.currentData())
        settings.setValue("chat/compare", self.compare_check.isChecked())

    def _restore_settings(self) -> None:
        settings = QSettings()
        method = settings.value("chat/method", "spectral")
        spectral = settings.value("chat/spectral", SPECTRAL_CONFIGS[0][0])
        for combo, value in ((self.method_combo, method), (self.spectral_combo, spectral)):
            index = combo.findData(value)
            if index >= 0:
                combo.setCurrentIndex(index)
        self.compare_check.setChecked(settings.value("chat/compare", False) in (True, "true"))

    def set_model(self, info: dict | None) -> None:
        self.model_info = info
        if info:
            self.status.setText(f"Ready: {info['name']}, context {info['context_length']:,} "
                                "tokens.")
        self._update_buttons()

    # ---- conversations ---------------------------------------------------------------
    def new_chat(self) -> None:
        if self.turn is not None:
            return
        self.conversation = new_conversation(self._model_name(), self.system_edit.text())
        self.last_stats = None
        self._reset_meters()
        self._clear_notice()
        self.chat_list.clearSelection()
        self.render()
        self._update_buttons()

    def open_chat(self, conversation_id: str) -> bool:
        if self.turn is not None:
            self._show_notice("Wait for the reply to finish (or stop it) before switching "
                              "chats.")
            return False
        try:
            self.conversation = self.store.load(conversation_id)
        except (OSError, ValueError) as e:
            self._show_notice(f"Could not open the chat: {e}")
            return False
        self.system_edit.setText(self.conversation.get("system", ""))
        self._clear_notice()
        self._reset_meters()
        last = next((m for m in reversed(self.conversation["messages"])
                     if m.get("role") == "assistant" and m.get("meta")), None)
        if last is not None:
            self._update_meters(last["meta"])
        self.render()
        self._select_in_list(conversation_id)
        self._update_buttons()
        return True

    def delete_selected(self, confirm: bool = True) -> None:
        item = self.chat_list.currentItem()
        if item is None or self.turn is not None:
            return
        conversation_id = item.data(Qt.ItemDataRole.UserRole)
        if confirm and QMessageBox.question(
                self, "Delete chat", f"Delete “{item.text().splitlines()[0]}”?") \
                != QMessageBox.StandardButton.Yes:
            return
        self.store.delete(conversation_id)
        if conversation_id == self.conversation["id"]:
            self.new_chat()
        self.refresh_list()

    def refresh_list(self) -> None:
        self.chat_list.blockSignals(True)
        self.chat_list.clear()
        for entry in self.store.list():
            item = QListWidgetItem(f"{entry['title']}\n{entry['updated'].replace('T', ' ')}")
            item.setData(Qt.ItemDataRole.UserRole, entry["id"])
            item.setToolTip(f"{entry['messages']} messages · {entry['id']}.json")
            self.chat_list.addItem(item)
        self.chat_list.blockSignals(False)
        self._select_in_list(self.conversation["id"])
        self.historyChanged.emit()

    def _select_in_list(self, conversation_id: str) -> None:
        for i in range(self.chat_list.count()):
            if self.chat_list.item(i).data(Qt.ItemDataRole.UserRole) == conversation_id:
                self.chat_list.setCurrentRow(i)
                return

    def _on_list_clicked(self, item: QListWidgetItem) -> None:
        conversation_id = item.data(Qt.ItemDataRole.UserRole)
        if conversation_id != self.conversation["id"]:
            self.open_chat(conversation_id)

    def save(self) -> None:
        if self.conversation["messages"]:
            self.conversation["system"] = self.system_edit.text()
            self.conversation["model"] = self._model_name() or self.conversation.get("model")
            self.store.save(self.conversation)
            self.refresh_list()

    def _model_name(self) -> str | None:
        return self.model_info["name"] if self.model_info else None

    # ---- turns ------------------------------------------------------------------------
    def send(self, text: str | None = None) -> bool:
        text = self.input.toPlainText() if text is None else text
        if not text.strip() or not self._can_start():
            return False
        self.conversation["messages"].append({"role": "user", "content": text.strip()})
        self.input.clear()
        if not self._start_turn(restore_text=text):
            return False
        return True

    def regenerate(self) -> bool:
        messages = self.conversation["messages"]
        if self.turn is not None or not messages or not self._can_start():
            return False
        if messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            return False
        return self._start_turn()

    def stop(self) -> None:
        if self.turn is None:
            return
        self.turn["stopping"] = True
        for job_id in self.turn["order"]:
            self.engine.cancel(job_id)
        self.status.setText("Stopping …")

    def _can_start(self) -> bool:
        if self.turn is not None:
            return False
        if self.model_info is None:
            self._show_notice("Load a model first (Model view, Ctrl+D).")
            return False
        if self.cache_spec() is None:
            self._show_notice("The Bits view has no plan yet: calibrate or load a bundle, or "
                              "pick another spectral configuration.")
            return False
        return True

    def engine_messages(self) -> list[dict]:
        system = self.system_edit.text().strip()
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": m["role"], "content": m["content"]}
                           for m in self.conversation["messages"]]

    def _start_turn(self, restore_text: str | None = None) -> bool:
        self._clear_notice()
        messages = self.engine_messages()
        spec = self.cache_spec()
        label = self.method_label()
        max_tokens = self.max_tokens_spin.value()
        compare = self.compare_check.isChecked() and self.method != "fp16"
        replies: dict[int, dict] = {}
        order: list[int] = []
        if compare:
            job_id = self.engine.generate(messages, max_tokens=max_tokens, cache="fp16")
            replies[job_id] = self._new_reply("reference", "fp16")
            order.append(job_id)
        job_id = self.engine.generate(messages, max_tokens=max_tokens, cache=spec)
        replies[job_id] = self._new_reply("main", label)
        order.append(job_id)
        self.turn = {"replies": replies, "order": order, "compare": compare,
                     "restore_text": restore_text, "stopping": False}
        self.status.setText(f"Replying with {label} …")
        self._timer.start()
        self.render()
        self._update_buttons()
        return True

    @staticmethod
    def _new_reply(role: str, method: str) -> dict:
        return {"role": role, "method": method, "pieces": [], "text": "", "stats": None,
                "state": "queued", "tokens": 0, "tokens_per_s": 0.0}

    def _reply(self, job_id: int) -> dict | None:
        if self.turn is None:
            return None
        return self.turn["replies"].get(job_id)

    # ---- engine events ------------------------------------------------------------------
    def _on_progress(self, job_id: int, kind: str, event: object) -> None:
        reply = self._reply(job_id)
        if reply is None or kind != "generate" or not isinstance(event, dict):
            return
        if "text" in event and "stage" not in event:
            reply["pieces"].append(event["text"])
            reply["text"] += event["text"]
            reply["tokens"] = event.get("tokens", reply["tokens"])
            reply["tokens_per_s"] = event.get("tokens_per_s", 0.0)
            reply["state"] = "streaming"
            self._dirty = True
            if not self.turn["stopping"]:
                self.status.setText(f"{reply['method']}: {reply['tokens']} tokens, "
                                    f"{reply['tokens_per_s']:.1f} tok/s …")
        elif event.get("stage") == "prompt":
            reply["state"] = "prefill"
            reply["method"] = event.get("method", reply["method"])
            self._show_context(event["prompt_tokens"], event["context_length"])
            self.status.setText(f"{reply['method']}: reading the {event['prompt_tokens']}-token "
                                "prompt …")
            self._dirty = True
        elif event.get("stage") == "done":
            reply["stats"] = {k: v for k, v in event.items() if k not in ("stage", "rotations")}
            reply["text"] = event["text"]
            reply["pieces"] = list(event["pieces"])

    def _on_finished(self, job_id: int, kind: str, result: object) -> None:
        reply = self._reply(job_id)
        if reply is None:
            return
        reply["stats"] = {k: v for k, v in result.items() if k != "rotations"}
        reply["text"], reply["pieces"] = result["text"], list(result["pieces"])
        reply["state"] = "done"
        self._maybe_finish_turn()

    def _on_cancelled(self, job_id: int, kind: str) -> None:
        reply = self._reply(job_id)
        if reply is None:
            return
        reply["state"] = "stopped"
        if reply["stats"] is not None:
            reply["stats"]["stopped"] = True
        self._maybe_finish_turn()

    def _on_failed(self, job_id: int, kind: str, message: str) -> None:
        reply = self._reply(job_id)
        if reply is None:
            return
        reply["state"] = "failed"
        for other in self.turn["order"]:  # a queued partner reply is pointless now
            if other != job_id:
                self.engine.cancel(other)
        self.turn["error"] = message
        self._maybe_finish_turn()

    def _maybe_finish_turn(self) -> None:
        turn = self.turn
        if any(r["state"] not in ("done", "stopped", "failed") for r in turn["replies"].values()):
            return
        self.turn = None
        self._timer.stop()
        replies = {r["role"]: r for r in turn["replies"].values()}
        main, reference = replies["main"], replies.get("reference")
        error = turn.get("error")
        message = None
        if error is None and (main["text"] or main["state"] == "done"):
            message = {"role": "assistant", "content": main["text"],
                       "meta": self._meta(main)}
            if reference is not None:
                message["compare"] = {"content": reference["text"],
                                      "meta": self._meta(reference),
                                      "divergence": divergence(reference, main)}
            self.conversation["messages"].append(message)
        elif error is None and reference is not None and reference["text"]:
            # Stopped before the compressed reply began: keep the fp16 one as the answer.
            message = {"role": "assistant", "content": reference["text"],
                       "meta": self._meta(reference)}
            self.conversation["messages"].append(message)
        if error is not None:
            self._drop_unanswered(turn.get("restore_text"))
            self._show_notice(error)
            self.status.setText("The reply failed.")
        else:
            last = message["meta"] if message else None
            if last:
                self._update_meters(last)
            self.status.setText(self._summary_line(message))
        self.save()
        self.render()
        self._update_buttons()
        if error is not None:
            self.turnFailed.emit(error)
        elif message is not None:
            self.turnFinished.emit(message)

    def _drop_unanswered(self, restore_text: str | None) -> None:
        messages = self.conversation["messages"]
        if restore_text is not None and messages and messages[-1]["role"] == "user":
            messages.pop()
            self.input.setPlainText(restore_text)

    @staticmethod
    def _meta(reply: dict) -> dict:
        stats = dict(reply["stats"] or {})
        stats.pop("text", None)
        stats.pop("pieces", None)
        meta = {"method": stats.get("method", reply["method"]),
                "tokens": stats.get("tokens", reply["tokens"]),
                "tokens_per_s": stats.get("tokens_per_s", reply["tokens_per_s"]),
                "stopped": reply["state"] == "stopped" or bool(stats.get("stopped"))}
        for key in ("prompt_tokens", "prompt_tokens_per_s", "finish_reason", "elapsed_s",
                    "context_length", "kv_bytes", "kv_fp16_bytes",
                    "kv_tokens", "kv_uncoded_tokens", "kv_append_batch", "bits_per_element",
                    "max_tokens"):
            if key in stats:
                meta[key] = stats[key]
        meta["pieces"] = list(reply["pieces"])
        return meta

    def _summary_line(self, message: dict | None) -> str:
        if message is None:
            return "Stopped before the reply began."
        meta = message["meta"]
        line = f"{meta['method']}: {meta['tokens']} tokens at {meta['tokens_per_s']:.1f} tok/s"
        if meta.get("stopped"):
            line += " (stopped)"
        compare = message.get("compare")
        if compare:
            d = compare["divergence"]
            line += (" · identical to fp16" if d["identical"]
                     else f" · parts from fp16 at token {d['token'] + 1}")
        return line

    # ---- meters --------------------------------------------------------------------------
    def _show_context(self, tokens: int, context: int) -> None:
        context = max(1, int(context or 1))
        self.context_bar.setRange(0, context)
        self.context_bar.setValue(min(int(tokens), context))
        self.context_label.setText(f"Context: <b>{tokens:,}</b> of {context:,} tokens "
                                   f"({100 * tokens / context:.1f} %)")

    def _update_meters(self, meta: dict) -> None:
        self.last_stats = meta
        if meta.get("context_length") and meta.get("prompt_tokens") is not None:
            self._show_context(meta["prompt_tokens"] + meta.get("tokens", 0),
                               meta["context_length"])
        if meta.get("kv_fp16_bytes"):
            kv, fp16 = meta["kv_bytes"], meta["kv_fp16_bytes"]
            self.kv_bar.setValue(int(round(1000 * min(1.0, kv / fp16))))
            self.kv_label.setText(f"KV cache: <b>{format_bytes(kv)}</b> measured vs fp16 "
                                  f"{format_bytes(fp16)} ({fp16 / max(1, kv):.1f}× smaller, "
                                  f"{meta.get('bits_per_element', 0):.1f} bits/elem)")
            waiting = meta.get("kv_uncoded_tokens", 0)
            self.kv_bar.setToolTip(
                f"{meta.get('method')}: {kv:,} bytes measured for {meta.get('kv_tokens', 0)} "
                f"tokens; the fp16 cache would hold {fp16:,} bytes"
                + (f". The newest {waiting} tokens are still exact (fp16): decoded tokens "
                   f"are coded {meta.get('kv_append_batch', 1)} at a time" if waiting else ""))

    def _reset_meters(self) -> None:
        self.context_bar.setRange(0, 1)
        self.context_bar.setValue(0)
        self.context_label.setText("Context: —")
        self.kv_bar.setValue(0)
        self.kv_label.setText("KV cache: —")

    # ---- notices, buttons ---------------------------------------------------------------------
    def _show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.show()

    def _clear_notice(self) -> None:
        self.notice.clear()
        self.notice.hide()

    def _update_buttons(self) -> None:
        idle = self.turn is None
        ready = idle and self.model_info is not None
        messages = self.conversation["messages"]
        self.send_button.setEnabled(ready)
        self.stop_button.setEnabled(not idle)
        self.regenerate_button.setEnabled(ready and bool(messages))
        self.new_button.setEnabled(idle)
        self.delete_button.setEnabled(idle)
        self.chat_list.setEnabled(idle)
        for w in (self.method_combo, self.max_tokens_spin, self.compare_check, self.system_edit):
            w.setEnabled(idle)
        self.spectral_combo.setEnabled(idle and self.method == "spectral")

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt naming)
        if (obj is self.input and event.type() == QEvent.Type.KeyPress
                and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
                and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier):
            self.send()
            return True
        if (obj is self.input and event.type() == QEvent.Type.KeyPress
                and event.key() == Qt.Key.Key_Escape and self.turn is not None):
            self.stop()
            return True
        return super().eventFilter(obj, event)

    # ---- rendering --------------------------------------------------------------------------
    def _render_if_dirty(self) -> None:
        if self._dirty:
            self.render()

    def render(self) -> None:
        self._dirty = False
        bar = self.transcript.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        old = bar.value()
        self.transcript.setHtml(self.transcript_html())
        bar.setValue(bar.maximum() if at_bottom else old)
        self.rendered.emit()

    def transcript_html(self) -> str:
        blocks = []
        system = self.system_edit.text().strip()
        if system:
            blocks.append(f"<p style='color:#707070'><i>System: {html.escape(system)}</i></p>")
        for message in self.conversation["messages"]:
            if message["role"] == "user":
                blocks.append(self._bubble("You", text_html(message["content"]), "", USER_BG))
            elif message.get("compare"):
                blocks.append(self._compare_html(message))
            else:
                meta = message.get("meta") or {}
                blocks.append(self._bubble(f"Assistant · {meta.get('method', '')}",
                                           text_html(message["content"]), meta_text(meta),
                                           ASSISTANT_BG))
        if self.turn is not None:
            replies = {r["role"]: r for r in self.turn["replies"].values()}
            if self.turn["compare"]:
                blocks.append(self._compare_live_html(replies["reference"], replies["main"]))
            else:
                main = replies["main"]
                blocks.append(self._bubble(f"Assistant · {main['method']}",
                                           text_html(main["text"], cursor=True),
                                           self._live_meta(main), ASSISTANT_BG))
        if not blocks:
            name = self._model_name() or "the model"
            blocks.append(f"<p style='color:#808080'>Ask {html.escape(name)} something. The "
                          "KV cache of every reply is built with the method below; the meters "
                          "show its measured size and how much of the context the chat "
                          "uses.</p>")
        return "<html><body>" + "".join(blocks) + "</body></html>"

    @staticmethod
    def _live_meta(reply: dict) -> str:
        if reply["state"] == "queued":
            return "waiting …"
        if reply["state"] == "prefill":
            return "reading the prompt …"
        return f"{reply['tokens']} tokens · {reply['tokens_per_s']:.1f} tok/s …"

    @staticmethod
    def _bubble(label: str, body: str, meta: str, background: str) -> str:
        meta_html = (f"<div style='color:#707070; font-size:small'>{html.escape(meta)}</div>"
                     if meta else "")
        return (f"<table width='100%' cellspacing='0' cellpadding='8' style='margin-top:8px'>"
                f"<tr><td style='background-color:{background}'>"
                f"<div style='color:#505050; font-size:small'><b>{html.escape(label)}</b></div>"
                f"<div>{body}</div>{meta_html}</td></tr></table>")

    def _compare_html(self, message: dict) -> str:
        compare = message["compare"]
        d = compare["divergence"]
        start = None if d["identical"] else d["word_char"]
        if d["identical"]:
            note = "<b>Identical</b> replies: the compressed cache chose every token fp16 chose."
        else:
            note = (f"Replies part at token <b>{d['token'] + 1}</b> (word "
                    f"“{html.escape(d['word'] or '')}”): highlighted from there.")
        left = (text_html(compare["content"], start), meta_text(compare["meta"]),
                "fp16 (reference)")
        right = (text_html(message["content"], start), meta_text(message.get("meta")),
                 (message.get("meta") or {}).get("method", ""))
        return self._two_columns(left, right, note)

    def _compare_live_html(self, reference: dict, main: dict) -> str:
        left = (text_html(reference["text"], cursor=reference["state"] in ("streaming",
                                                                           "prefill")),
                self._live_meta(reference) if reference["state"] != "done"
                else meta_text(ChatView._meta(reference)), "fp16 (reference)")
        right = (text_html(main["text"], cursor=main["state"] in ("streaming", "prefill")),
                 self._live_meta(main), main["method"])
        return self._two_columns(left, right, "Side by side: fp16 first, then the compressed "
                                              "cache …")

    @staticmethod
    def _two_columns(left, right, note: str) -> str:
        cells = "".join(
            f"<td width='50%' valign='top' style='background-color:{ASSISTANT_BG}'>"
            f"<div style='color:#505050; font-size:small'><b>{html.escape(label)}</b></div>"
            f"<div>{body}</div><div style='color:#707070; font-size:small'>"
            f"{html.escape(meta)}</div></td>"
            for body, meta, label in (left, right))
        return (f"<table width='100%' cellspacing='4' cellpadding='8' style='margin-top:8px'>"
                f"<tr>{cells}</tr></table><p style='color:#505050; font-size:small; "
                f"margin-left:6px'>{note}</p>")

    # ---- for tests and the report -------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.turn is not None

    def title(self) -> str:
        return title_of(self.conversation)
