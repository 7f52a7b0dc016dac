"""A gate for handlers in daemon processes, so a test can hold a run at a known point: with
``PROJECTOR_TEST_GATE=<dir>`` set, once the process has handled ``PROJECTOR_TEST_GATE_AFTER``
events, its handler writes ``<dir>/waiting`` and holds the batch until the test deletes
``<dir>/closed``. Without the variable it does nothing. The wait polls a file: the test's
signal comes from another process, and this is the fault being injected, not a test waiting
for something to happen."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_handled = [0]  # events handled by this process
_released = threading.Event()


def pass_through(count: int) -> None:
    """Called by a handler with the number of events in its batch, before it handles them."""
    gate = os.environ.get("PROJECTOR_TEST_GATE")
    if not gate:
        return
    _handled[0] += count
    if _handled[0] < int(os.environ.get("PROJECTOR_TEST_GATE_AFTER", "0")):
        return
    closed = Path(gate) / "closed"
    if closed.exists():
        (Path(gate) / "waiting").touch()
        while closed.exists():
            _released.wait(0.02)
