"""A handler for tests: the accounts view, except that events marked ``poison`` raise until the
bug is "fixed" (``BROKEN["on"] = False``), the way a deploy fixes a handler bug."""

from __future__ import annotations

from collections.abc import Sequence

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = accounts.MIGRATIONS
BROKEN = {"on": True}


def handle(events: Sequence[Event], view: PgView) -> None:
    for event in events:
        if event.data.get("poison") and BROKEN["on"]:
            raise KeyError(f"handler bug on {event.id}")
    accounts.handle(events, view)
