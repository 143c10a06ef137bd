"""``velox-studio``: launch the desktop studio."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SMOKE_TIMEOUT_MS = 600_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velox-studio", description="Velox Studio")
    parser.add_argument("--model", help="load this model at start ('default', a GGUF, a folder)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="load the default model offscreen, show the window, exit 0 on success")
    return parser


def icon_dir() -> Path:
    """assets/icon ($VELOX_ASSETS overrides; in a PyInstaller bundle assets/ is beside studio/)."""
    env = os.environ.get("VELOX_ASSETS")
    return (Path(env) if env else Path(__file__).resolve().parent.parent / "assets") / "icon"


def make_app(argv: list[str]):
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(argv)
    app.setOrganizationName("Velox")
    app.setApplicationName("Velox Studio")
    app.setStyle("Fusion")
    icon = QIcon()
    for png in sorted(icon_dir().glob("velox-*.png")):
        icon.addFile(str(png))
    if not icon.isNull():
        app.setWindowIcon(icon)
    return app


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke_test:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = make_app(sys.argv[:1])

    from .engine import Engine
    from .main_window import MainWindow

    engine = Engine()
    window = MainWindow(engine)
    app.aboutToQuit.connect(engine.shutdown)
    window.show()
    status = {"code": 0}

    if args.smoke_test:
        from PySide6.QtCore import QTimer

        def finished(job_id, kind, info):
            print(f"smoke test: loaded {info['name']}: {info['num_layers']} layers, "
                  f"{info['num_kv_heads']} KV heads, head_dim {info['head_dim']}")
            app.quit()

        def failed(job_id, kind, message):
            print(f"smoke test: FAILED: {message}", file=sys.stderr)
            status["code"] = 1
            app.quit()

        def timeout():
            print("smoke test: FAILED: timed out", file=sys.stderr)
            status["code"] = 2
            app.quit()

        engine.jobFinished.connect(finished)
        engine.jobFailed.connect(failed)
        QTimer.singleShot(SMOKE_TIMEOUT_MS, timeout)
        window.model_view.load(args.model or "default")
    elif args.model:
        window.model_view.load(args.model)

    code = app.exec()
    engine.shutdown()
    return status["code"] or code


if __name__ == "__main__":
    sys.exit(main())
