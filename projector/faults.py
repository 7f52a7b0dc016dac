"""Crash points for the fault suite (issue: prove a crash anywhere loses nothing).

``PROJECTOR_CRASH_AT=<point>[,<point>...]`` makes the process kill itself with SIGKILL, as a
crash would, the Nth time (``PROJECTOR_CRASH_AFTER``, default 1) it reaches one of the named
points. Unset, as in production, a point costs one set lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "after-park",  # parked events written, the batch not committed
    "mid-drain",  # parked events taken out of holding, the batch not committed
    "before-commit",  # every write of the batch done, its COMMIT (or EXEC) not sent
    "after-commit",  # the batch committed, Kafka's offsets not committed
    "mid-replay-request",  # gaps claimed (their schedule moved on), the requests not sent
)

_ARMED = frozenset(p for p in os.environ.get("PROJECTOR_CRASH_AT", "").split(",") if p)
_AFTER = int(os.environ.get("PROJECTOR_CRASH_AFTER", "1"))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here if this point is armed and reached for the Nth time."""
    if name in _ARMED:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= _AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
