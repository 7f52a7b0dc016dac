"""The enrolment history: one row per business event of the school correlation (the seed's
``enroll`` / ``change`` / ``unenroll`` / ``update``, named by
:func:`handlers.school_correlation.name_business_events`; see docs/correlation.md).

Configure it beside ``handlers.school`` in the school projection, with a ``correlation``
section whose rule is ``handlers.school_correlation:name_business_events``. It keeps no
documents (``handle_documents`` does nothing): only ``handle_business`` writes.

``enrolment_history(business_id, type, student_id, course_id, at, data)``: the business
event's stable id is the key, so a replay, a retry or a rebuild inserts each event once
(``on conflict do nothing``); ``at`` is the transaction's commit time (the business event's
``ts``, epoch ms); ``course_id`` is the new course of a ``change``; ``data`` the whole event
data. A student or course the transaction did not touch is ``null`` in ``data`` and named in
``data.lookup``: read it from ``handlers.school``'s ``students`` / ``courses`` when needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from projector.apply import DocumentChange, PgView
from projector.core.event import Event

MIGRATIONS = [
    """
    create table enrolment_history (
        business_id text primary key,
        type text not null,
        student_id bigint,
        course_id bigint,
        at timestamptz,
        data jsonb not null
    )
    """,
    "create index enrolment_history_student on enrolment_history (student_id, at)",
]

INSERT = (
    "insert into enrolment_history (business_id, type, student_id, course_id, at, data)"
    " values (%s, %s, %s, %s, %s, %s) on conflict (business_id) do nothing"
)


def handle_documents(changes: Sequence[DocumentChange], view: PgView) -> None:
    """Rows are ``handlers.school``'s business; the history is made of business events."""


def handle_business(events: Sequence[Event], view: PgView) -> None:
    """One row per business event, in one ``executemany``."""
    if events:
        view.executemany(INSERT, [_row(e) for e in events])


def _row(event: Event) -> tuple[Any, ...]:
    data = event.data
    student = data.get("student_id", _id(data.get("student")))
    course = data.get("course_id", data.get("newcourse_id", _id(data.get("course"))))
    at = None if event.ts is None else datetime.fromtimestamp(event.ts / 1000, UTC)
    return (event.id, event.type, student, course, at, Jsonb(data))


def _id(row: Any) -> Any:
    return row.get("id") if isinstance(row, dict) else None
