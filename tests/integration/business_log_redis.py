"""The Redis counterpart of :mod:`tests.integration.business_log` (same failure switches, same
rule): every business event it is handed is counted in the hash ``business_log:applied``
(business id -> how many times it was applied, so a business event applied twice shows as a
count of 2) and kept as JSON in ``business_log:event`` (business id -> type, stream, data,
meta)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from projector.apply import DocumentChange
from projector.core.event import Event
from projector.store.redis_view import RedisView
from tests.integration.business_log import FAIL_HANDLER_FOR, rule

__all__ = ["handle_business", "handle_documents", "rule"]

APPLIED = "business_log:applied"
EVENTS = "business_log:event"


def handle_documents(changes: Sequence[DocumentChange], view: RedisView) -> None:
    """The rows are the document handler's (configured beside this one)."""


def handle_business(events: Sequence[Event], view: RedisView) -> None:
    failing = [e.id for e in events if e.data.get("student_id") in FAIL_HANDLER_FOR]
    if failing:
        raise ValueError(f"handler broken for {failing}")
    for e in events:
        view.hincrby(APPLIED, e.id)
        record = {"type": e.type, "stream": e.stream, "data": e.data, "meta": e.meta}
        view.hset(EVENTS, {e.id: json.dumps(record)})
