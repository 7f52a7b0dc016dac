"""A handler for tests: the accounts view, except that an event marked ``block`` holds the
batch until the test releases it, the way a stuck handler stalls the poll loop."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = accounts.MIGRATIONS
RELEASE = threading.Event()


def handle(events: Sequence[Event], view: PgView) -> None:
    if any(e.data.get("block") for e in events):
        RELEASE.wait(timeout=60)
    accounts.handle(events, view)
