"""The enrolment history of :mod:`handlers.school_history`, kept in Redis (store: redis).

Same business events (the school correlation's ``enroll`` / ``change`` / ``unenroll`` /
``update``, named by :func:`handlers.school_correlation.name_business_events`; see
docs/correlation.md); only the layout differs. Configure it beside a Redis document handler
(``handlers.profiles_redis`` keeps each row as ``doc:<table>:<id>``) in a merge projection with
``store: redis`` and the school ``correlation`` section. It keeps no documents
(``handle_documents`` does nothing): only ``handle_business`` writes.

Keys, as the handler names them (a reader prefixes each with
``<redis.prefix>:v:<view_schema>:<version>:``, the version being in
``<redis.prefix>:v:<view_schema>:active``):

- ``history:<business_id>`` hash: ``type``, ``student_id`` and ``course_id`` (absent when the
  event names none; ``course_id`` is the new course of a ``change``), ``at`` (the business
  event's ``ts``: the transaction's commit time, epoch ms), ``data`` (the event data as JSON;
  a student or course the transaction did not touch is ``null`` there and named in
  ``data.lookup``: read it from the document view when needed).
- ``history`` sorted set: every business id, scored by ``at``.
- ``student_history:<student_id>`` sorted set: that student's business ids, scored by ``at``
  (``ZRANGE student_history:42 0 -1`` lists a student's history in time order).

Every write is keyed by the business event's stable id and sets the same values each time,
so a replay, a retry or a rebuild applies each event once (the Redis counterpart of
``on conflict do nothing``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from projector.apply import DocumentChange
from projector.core.event import Event
from projector.store.redis_view import RedisView, Value

ALL = "history"


def key(business_id: str) -> str:
    """The hash of one business event."""
    return f"history:{business_id}"


def student_key(student_id: Any) -> str:
    """The sorted set of one student's business events."""
    return f"student_history:{student_id}"


def handle_documents(changes: Sequence[DocumentChange], view: RedisView) -> None:
    """Rows are the document handler's business; the history is made of business events."""


def handle_business(events: Sequence[Event], view: RedisView) -> None:
    """Per business event: its hash, and its id in the time-ordered sets."""
    for event in events:
        fields = _fields(event)
        view.hset(key(event.id), fields)
        at = event.ts or 0
        view.zadd(ALL, {event.id: at})
        if "student_id" in fields:
            view.zadd(student_key(fields["student_id"]), {event.id: at})


def _fields(event: Event) -> dict[str, Value]:
    data = event.data
    student = data.get("student_id", _id(data.get("student")))
    course = data.get("course_id", data.get("newcourse_id", _id(data.get("course"))))
    fields: dict[str, Value] = {"type": event.type, "data": json.dumps(data, sort_keys=True)}
    for name, value in (("student_id", student), ("course_id", course), ("at", event.ts)):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            fields[name] = value
    return fields


def _id(row: Any) -> Any:
    return row.get("id") if isinstance(row, dict) else None
