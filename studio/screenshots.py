"""Render every view of the studio to PNG with the real default model.

    python -m studio.screenshots OUTDIR        # e.g. docs/images
    xvfb-run -a -s "-screen 0 1280x900x24" python -m studio.screenshots docs/images

Loads the default model, runs a short calibration (for the Calibrate view's live
chart), then loads the rotation bundle shipped for the model instead of a long
calibration, measures the Bits view's plan, and has one short chat. Qt settings
and chat history go to a temporary folder, so the user's own never show up. Runs
offscreen when no display is set. Takes about a minute on a laptop CPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 1280, 860
TIMEOUT_MS = 300_000
CALIBRATION = {"samples": 8, "seq_len": 256}
LAYER = 12
CHAT = [("What is the capital of France?", False), ("Name three primary colors.", True)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    scratch = tempfile.TemporaryDirectory(prefix="velox-screenshots-")
    os.environ["VELOX_DATA_DIR"] = scratch.name

    from PySide6.QtCore import QSettings, Qt
    from PySide6.QtWidgets import QDockWidget

    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, scratch.name)

    from .app import make_app
    from .engine import Engine
    from .main_window import MainWindow
    from .waiting import wait_for as wait_for_signal

    app = make_app([sys.argv[0]])
    engine = Engine()
    window = MainWindow(engine)
    window.resize(WIDTH, HEIGHT)
    window.show()
    dock = window.findChild(QDockWidget, "log-dock")
    if dock is not None:
        window.resizeDocks([dock], [110], Qt.Orientation.Vertical)

    def wait_for(signal, accept=lambda *args: True):
        got = wait_for_signal(signal, TIMEOUT_MS, accept)
        if got is None:
            raise SystemExit(f"screenshots: timed out waiting for {signal}")
        return got

    def settle(ms: int = 300) -> None:
        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    failures: list[str] = []
    engine.jobFailed.connect(lambda jid, kind, message: failures.append(f"{kind}: {message}"))

    def job_done(kind: str):
        def accept(job_id, k, *rest):
            return k == kind
        return accept

    def shoot(name: str) -> None:
        window.show_view(name.capitalize())
        settle()
        path = out / f"{name}.png"
        window.grab().save(str(path))
        print(f"screenshots: {path}")

    window.model_view.load("default")
    wait_for(window.model_view.modelLoaded)
    shoot("model")

    cal = window.calibrate_view
    cal.samples_spin.setValue(CALIBRATION["samples"])
    cal.seq_spin.setValue(CALIBRATION["seq_len"])
    cal.layer_spin.setValue(LAYER)
    window.show_view("Calibrate")
    cal.start()
    wait_for(engine.jobFinished, job_done("calibrate"))
    shoot("calibrate")

    engine.load_shipped_bundle()  # a 64 × 1024-token calibration, shipped with Velox
    wait_for(engine.jobFinished, job_done("load_bundle"))
    spectrum = window.spectrum_view
    spectrum.select_layer(LAYER)
    spectrum.head_combo.setCurrentIndex(spectrum.head_combo.findData(spectrum.HEAD_EACH))
    shoot("spectrum")

    bits = window.bits_view
    bits.select_layer(LAYER)
    window.show_view("Bits")
    bits.measure()
    wait_for(engine.jobFinished, job_done("measure"))
    shoot("bits")

    chat = window.chat_view
    chat.set_method("spectral", "spectral:wf3/a4g64+qm+ad+x1.5+vh+la")
    chat.max_tokens_spin.setValue(24)
    window.show_view("Chat")
    for text, compare in CHAT:
        chat.compare_check.setChecked(compare)
        chat.send(text)
        wait_for(chat.turnFinished)
    chat.compare_check.setChecked(False)
    shoot("chat")

    window.close()
    stopped = engine.shutdown()
    scratch.cleanup()
    if failures:
        print("screenshots: jobs failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0 if stopped else 1


if __name__ == "__main__":
    sys.exit(main())
