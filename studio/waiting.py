"""Block on a Qt signal while the event loop keeps running (scripts and tests)."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QEventLoop, QTimer


def wait_for(signal, timeout_ms: int, accept: Callable[..., bool] = lambda *args: True):
    """Run the event loop until ``signal`` fires with arguments ``accept`` likes.

    Returns those arguments as a tuple, or None after ``timeout_ms``.
    """
    loop, got = QEventLoop(), []

    def on(*args):
        if accept(*args):
            got.append(args)
            loop.quit()

    signal.connect(on)
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()
    signal.disconnect(on)
    return got[0] if got else None
