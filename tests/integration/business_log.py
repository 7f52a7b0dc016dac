"""A test handler for correlations, configured after ``handlers.school``: every business
event it is handed is appended to ``business_log`` (no unique key: a business event applied twice shows as
two rows, which ``handlers.school_history``'s ``on conflict do nothing`` would hide)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from psycopg.types.json import Jsonb

from handlers.school_correlation import name_business_events
from projector.apply import DocumentChange, PgView
from projector.core.correlate import BusinessEvent
from projector.core.event import Event

# Set by an in-process test: the students whose business events the handler fails on, and
# those whose transaction the rule (``rule`` below) fails on.
FAIL_HANDLER_FOR: set[int] = set()
FAIL_RULE_FOR: set[int] = set()

MIGRATIONS = [
    "create table business_log (n bigserial primary key, id text not null, type text not null,"
    " stream text not null, data jsonb not null, meta jsonb not null)"
]


def handle_documents(changes: Sequence[DocumentChange], view: PgView) -> None:
    """The rows are ``handlers.school``'s (configured beside this one)."""


def rule(parts: Mapping[str, Sequence[Event]]) -> list[BusinessEvent]:
    """The school rule, failing on the students of ``FAIL_RULE_FOR``."""
    students: set[int] = {e.data["id"] for e in parts.get("student", ())}
    if students & FAIL_RULE_FOR:
        raise RuntimeError(f"rule broken for {sorted(students & FAIL_RULE_FOR)}")
    return name_business_events(parts)


def handle_business(events: Sequence[Event], view: PgView) -> None:
    failing = [e.id for e in events if e.data.get("student_id") in FAIL_HANDLER_FOR]
    if failing:
        raise ValueError(f"handler broken for {failing}")
    view.executemany(
        "insert into business_log (id, type, stream, data, meta) values (%s, %s, %s, %s, %s)",
        [(e.id, e.type, e.stream, Jsonb(e.data), Jsonb(e.meta)) for e in events],
    )
