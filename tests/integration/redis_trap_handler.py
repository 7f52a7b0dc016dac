"""A Redis handler for the tests of a write Redis refuses: counts each stream's events
(``count:<stream>``), and for an event whose data holds ``trap`` also writes the hash
``trap``, which a test makes a string beforehand (WRONGTYPE: refused by the batch script)."""

from __future__ import annotations

from collections.abc import Sequence

from projector.core.event import Event
from projector.store.redis_view import RedisView


def handle(events: Sequence[Event], view: RedisView) -> None:
    for e in events:
        view.incrby(f"count:{e.stream}")
        if e.data.get("trap"):
            view.hset("trap", {"by": e.stream})
