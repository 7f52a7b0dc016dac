"""The benchmark's account view in Redis (store: redis): per account a hash ``account:<n>`` with
``owner``, ``balance`` (cents) and ``events`` (events applied).

The counters are blind increments (HINCRBY), with no read: correct only because projector
hands each stream's events over in order and exactly once. The batch is folded first, so each
touched account costs two or three writes however many of its events the batch holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from projector.core.event import Event
from projector.store.redis_view import RedisView

_SIGN = {"DEPOSITED": 1, "WITHDRAWN": -1, "OPENED": 0}


def handle(events: Sequence[Event], view: RedisView) -> None:
    totals: dict[str, list[int]] = {}  # stream -> [balance change, events]
    owners: dict[str, str] = {}
    for e in events:
        sign = _SIGN.get(e.type)
        if sign is None:
            continue
        total = totals.setdefault(e.stream, [0, 0])
        if sign:
            total[0] += sign * e.data["amount"]
        else:
            owners[e.stream] = e.data["owner"]
        total[1] += 1
    for stream, (change, count) in totals.items():
        if stream in owners:
            view.hset(stream, {"owner": owners[stream]})
        view.hincrby(stream, "balance", change)
        view.hincrby(stream, "events", count)
