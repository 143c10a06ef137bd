"""Chat, Measure and Export report on the real engine thread and the real default model.

One window and engine serve the module (the default model loads once); the
teardown checks that the engine's QThread stops. Replies are short (≤ 12 tokens)
because a compressed cache decodes slowly on CPU.
"""

import json
import os
import subprocess
import sys

import pytest
from PySide6.QtCore import Qt
from qtwait import wait_for

from studio.chat_store import ChatStore
from studio.engine import Engine
from studio.main_window import MainWindow
from studio.views.chat_view import ChatView, divergence

pytestmark = pytest.mark.slow

LOAD_TIMEOUT_MS = 180_000
REPLY_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def studio(qapp, tmp_path_factory):
    engine = Engine()
    window = MainWindow(engine)
    window.chat_view.store = ChatStore(tmp_path_factory.mktemp("chats"))
    window.chat_view.refresh_list()
    window.resize(1280, 860)
    window.show()
    window.model_view.load("default")
    wait_for(window.model_view.modelLoaded, LOAD_TIMEOUT_MS)
    window.show_view("Chat")
    yield window, engine
    window.close()
    assert engine.shutdown(), "the engine's QThread did not stop"
    assert not engine.is_running()
    window.deleteLater()


@pytest.fixture
def chat(studio):
    window, _ = studio
    view: ChatView = window.chat_view
    view.new_chat()
    view.compare_check.setChecked(False)
    view.system_edit.clear()
    view.max_tokens_spin.setValue(12)
    return view


def test_spectral_chat_end_to_end_with_shipped_bundle_meters_and_history(studio, chat):
    window, engine = studio
    assert window.bits_view.summary is None  # no rotations yet: the job loads the shipped ones
    chat.set_method("spectral", "spectral:wf3/a4g64+qm+ad+x1.5+vh+la")
    chat.input.setPlainText("What is the capital of France?")
    chat.send_button.click()
    assert chat.busy and chat.stop_button.isEnabled() and not chat.send_button.isEnabled()
    message = wait_for(chat.turnFinished, REPLY_TIMEOUT_MS)[0]

    assert "Paris" in message["content"]
    meta = message["meta"]
    assert meta["method"] == "spectral:wf3/a4g64+qm+ad+x1.5+vh+la" and not meta["stopped"]
    assert 0 < meta["tokens"] <= 12 and meta["tokens_per_s"] > 0
    # Measured cache bytes, below the fp16 cache for the same tokens.
    assert 0 < meta["kv_bytes"] < meta["kv_fp16_bytes"]
    assert "measured vs fp16" in chat.kv_label.text()
    # The reply's tokens wait at fp16 for a batched append, and the meter says so.
    assert 0 < meta["kv_uncoded_tokens"] < meta["kv_append_batch"] == 32
    assert "still exact" in chat.kv_bar.toolTip() and "32 at a time" in chat.kv_bar.toolTip()
    assert 0 < chat.kv_bar.value() < 1000
    assert meta["prompt_tokens"] + meta["tokens"] == chat.context_bar.value()
    assert "of 8,192 tokens" in chat.context_label.text()
    assert "tok/s" in chat.transcript.toPlainText() and "Paris" in chat.transcript.toPlainText()
    # The shipped bundle reached the engine and the Spectrum and Bits views.
    assert "smollm2-135m-instruct-pre" in window.bits_view.summary["source"]
    assert window.spectrum_view.summary is not None
    assert not window.error_dialogs

    # History: one JSON file per conversation, reopenable from the list.
    conversation_id = chat.conversation["id"]
    path = chat.store.path(conversation_id)
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert "Paris" in saved["messages"][1]["content"]
    assert saved["title"] == "What is the capital of France?"
    assert not list(path.parent.glob(".*tmp*"))  # the atomic write left no temporary file
    chat.new_chat()
    assert chat.conversation["messages"] == [] and "Paris" not in chat.transcript.toPlainText()
    assert chat.chat_list.count() == 1
    item = chat.chat_list.item(0)
    assert item.data(Qt.ItemDataRole.UserRole) == conversation_id
    chat.chat_list.itemClicked.emit(item)
    assert chat.conversation["id"] == conversation_id
    assert "Paris" in chat.transcript.toPlainText()
    assert "measured vs fp16" in chat.kv_label.text()
    # The reply's tokens wait at fp16 for a batched append, and the meter says so.
    assert 0 < meta["kv_uncoded_tokens"] < meta["kv_append_batch"] == 32
    assert "still exact" in chat.kv_bar.toolTip() and "32 at a time" in chat.kv_bar.toolTip()


def test_stop_keeps_the_partial_reply_and_regenerate_replaces_it(studio, chat):
    window, engine = studio
    chat.set_method("fp16")
    chat.max_tokens_spin.setValue(200)
    pieces = []
    engine.jobProgress.connect(lambda jid, kind, ev: pieces.append(ev["text"])
                               if kind == "generate" and "text" in ev and "stage" not in ev
                               else None)
    chat.send("Write a long story about a dragon who learns to bake bread.")
    wait_for(engine.jobProgress, REPLY_TIMEOUT_MS,
             lambda jid, kind, ev: kind == "generate" and len(pieces) >= 3)
    chat.stop_button.click()
    message = wait_for(chat.turnFinished, REPLY_TIMEOUT_MS)[0]
    assert message["meta"]["stopped"]
    assert message["content"] and message["content"] == "".join(pieces)
    assert message["meta"]["tokens"] < 200
    assert "stopped" in chat.transcript.toPlainText()
    assert not chat.busy and chat.send_button.isEnabled() and not engine.busy

    # Still usable: regenerate answers the same user message again, in place.
    chat.max_tokens_spin.setValue(6)
    assert chat.regenerate()
    again = wait_for(chat.turnFinished, REPLY_TIMEOUT_MS)[0]
    assert not again["meta"]["stopped"] and again["meta"]["tokens"] <= 6
    assert [m["role"] for m in chat.conversation["messages"]] == ["user", "assistant"]
    assert chat.conversation["messages"][-1]["content"] == again["content"]
    first, second = message["content"], again["content"]
    assert first.startswith(second) or second.startswith(first)  # greedy: the same opening


def test_an_overlong_prompt_gets_a_clear_message(studio, chat):
    window, engine = studio
    chat.set_method("fp16")
    text = "word " * 9000
    chat.input.setPlainText(text)
    chat.send()
    error = wait_for(chat.turnFailed, REPLY_TIMEOUT_MS)[0]
    assert "context window" in error and "8,192" in error
    assert chat.notice.isVisible() and "context window" in chat.notice.text()
    assert chat.conversation["messages"] == []  # nothing half-sent stays in the history
    assert chat.input.toPlainText() == text  # the message is back for shortening
    assert not window.error_dialogs  # shown inline, not as a dialog
    assert chat.send_button.isEnabled()


def test_side_by_side_answers_twice_and_marks_the_divergence(studio, chat):
    window, engine = studio
    chat.set_method("spectral", "spectral:wf2.5/a4g64")
    chat.compare_check.setChecked(True)
    chat.send("Name three primary colors.")
    message = wait_for(chat.turnFinished, REPLY_TIMEOUT_MS)[0]
    compare = message["compare"]
    assert compare["meta"]["method"] == "fp16"
    assert message["meta"]["method"] == "spectral:wf2.5/a4g64"
    assert compare["content"] and message["content"]
    d = compare["divergence"]
    html = chat.transcript_html()
    if d["identical"]:
        assert compare["content"] == message["content"] and "Identical" in html
    else:
        assert compare["content"][: d["char"]] == message["content"][: d["char"]]
        assert "part at token" in html and "background-color:#ffe08a" in html
    assert "fp16 (reference)" in chat.transcript.toPlainText()


def test_divergence_marks_the_first_differing_token_and_its_word():
    reference = {"text": "The capital of France is Paris.",
                 "pieces": ["The", " capital", " of", " France", " is", " Paris", "."]}
    other = {"text": "The capital of France is Lyon.",
             "pieces": ["The", " capital", " of", " France", " is", " Ly", "on", "."]}
    d = divergence(reference, other)
    assert not d["identical"] and d["token"] == 5 and d["word"] == "Paris."
    assert reference["text"][d["word_char"]:].startswith("Paris")
    assert divergence(reference, dict(reference))["identical"]


def test_measure_overlays_measured_on_predicted_and_the_report_exports(studio, tmp_path):
    window, engine = studio
    bits = window.bits_view
    if bits.summary is None:
        engine.load_shipped_bundle()
        wait_for(engine.jobFinished, REPLY_TIMEOUT_MS, lambda jid, kind, r: kind == "load_bundle")
    window.show_view("Bits")
    bits.set_key_target(3.0)
    bits.recompute()
    bits.measure_button.click()
    assert bits.measure_button.text() == "Cancel measuring"
    result = wait_for(engine.jobFinished, REPLY_TIMEOUT_MS,
                      lambda jid, kind, r: kind == "measure")[2]
    methods = [r["method"] for r in result["results"]]
    assert methods[0] == "fp16" and methods[1].startswith("spectral: plan K3")
    spectral = result["results"][1]
    assert spectral["kld"] > 0 and 2.5 < spectral["bits_per_element"] < 4.5
    assert len(result["key_mse"]) == bits.summary["num_layers"]
    assert bits.measured_is_current()
    text = bits.measure_label.text()
    assert "KL" in text and "measured" in text and "predicted" in text
    assert len(bits.measured_marks["keys"].data) == bits.summary["num_layers"]
    bits.set_key_target(2.0)
    bits.recompute()
    assert not bits.measured_is_current() and "earlier plan" in bits.measure_label.text()

    window.show_view("Chat")
    path = window.export_report(str(tmp_path / "report"))
    assert window.stack.currentWidget() is window.chat_view  # the view came back
    report = path.read_text()
    for chart in ("spectrum.png", "heatmap.png", "participation.png", "bits.png",
                  "layers.png"):
        png = tmp_path / "report" / chart
        assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"({chart})" in report
    assert "## Model" in report and "SmolLM2" in report and "## Bit plan" in report
    assert "| Score-weighted keys PR |" in report  # the shipped bundle has the metric
    assert "## Measured" in report and "earlier plan" in report
    assert json.loads((tmp_path / "report" / "bit_plan.json").read_text())["key_avg_bits"] == 2.0
    assert not window.error_dialogs


def test_screenshots_script_renders_every_view(tmp_path):
    out = tmp_path / "images"
    run = subprocess.run([sys.executable, "-m", "studio.screenshots", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert run.returncode == 0, run.stderr[-2000:]
    for view in ("model", "calibrate", "spectrum", "bits", "chat"):
        png = out / f"{view}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000, view
    usage = subprocess.run([sys.executable, "-m", "studio.screenshots"], capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 2 and "OUTDIR" in usage.stderr
