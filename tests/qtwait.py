"""A test's wait on a Qt signal: fails the test on a time-out."""

from studio.waiting import wait_for as wait_for_signal


def wait_for(signal, timeout_ms: int, accept=lambda *args: True):
    """Run the event loop until ``signal`` fires with arguments ``accept`` likes."""
    got = wait_for_signal(signal, timeout_ms, accept)
    assert got is not None, f"timed out after {timeout_ms} ms"
    return got
