"""The seed's business events, named from one school transaction's correlated row changes.

Configure a correlation over the three Debezium tables with the parts named ``student``
(``public.student``), ``course`` (``public.course``) and ``student_course``
(``public.student_course``), and ``rule: handlers.school_correlation:name_business_events``.
The correlation gathers one transaction's changes (see :mod:`projector.core.correlate`); this
rule says what the transaction did:

- ``enroll`` ``{student_id, course_id, student, course, lookup}``: a STUDENT_COURSE row was
  created (the seed's STUDENT + COURSE + STUDENT_COURSE; one event per course enrolled in);
- ``change`` ``{student_id, oldcourse_id, newcourse_id, student, newcourse, lookup}``: a
  student moved to another course: a STUDENT_COURSE update, or, since Debezium turns an update
  of a primary key into a delete and a create, a removal and a creation for one student;
- ``unenroll`` ``{student_id, course_id}``: STUDENT_COURSE rows removed, nothing created;
- ``update`` ``{student}`` or ``{course}``: no STUDENT_COURSE change; one per row created or
  updated (a deleted student or course names nothing: the row views say it).

A student or course whose row is not among the parts (the transaction did not touch it: the
student changed course, the course already existed) is ``None`` in the data and listed in
``lookup`` as ``{field: {"table": ..., "id": ...}}``: the handler reads it from the view in the
same transaction (``courses``, ``students``), which holds it, since the row was committed
earlier than this transaction. The rule itself stays pure and deterministic, as a rebuild
needs: it reads nothing but the parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from projector.core.correlate import BusinessEvent
from projector.core.event import Event

STUDENT, COURSE, LINK = "student", "course", "student_course"
CREATED = frozenset({"create", "read"})

Rows = dict[int, dict[str, Any]]


def name_business_events(parts: Mapping[str, Sequence[Event]]) -> list[BusinessEvent]:
    """The business events of one transaction's parts (each part's events in commit order)."""
    students, courses = _rows(parts.get(STUDENT, ())), _rows(parts.get(COURSE, ()))
    links = parts.get(LINK, ())
    if not links:
        return _updates(STUDENT, students) + _updates(COURSE, courses)
    named: list[BusinessEvent] = []
    for sid in sorted({e.data["student_id"] for e in links if "student_id" in e.data}):
        mine = [e for e in links if e.data.get("student_id") == sid]
        named += _for_student(sid, mine, students, courses)
    return named


def _rows(events: Sequence[Event]) -> Rows:
    """Each row's last state in the transaction (deleted rows left out)."""
    rows: Rows = {}
    for event in events:
        if event.type == "delete":
            rows.pop(event.data.get("id"), None)  # type: ignore[arg-type]
        else:
            rows[event.data["id"]] = event.data
    return rows


def _updates(table: str, rows: Rows) -> list[BusinessEvent]:
    return [BusinessEvent("update", {table: row}, f"{table}:{rid}") for rid, row in rows.items()]


def _for_student(
    sid: int, links: Sequence[Event], students: Rows, courses: Rows
) -> list[BusinessEvent]:
    added = [e.data["course_id"] for e in links if e.type in CREATED]
    removed = [e.data["course_id"] for e in links if e.type == "delete"]
    updated = [e.data["course_id"] for e in links if e.type == "update"]
    stream = f"student:{sid}"
    if updated or (added and removed):
        new = (updated or added)[-1]
        data = {"student_id": sid, "oldcourse_id": removed[0] if removed else None}
        data |= {"newcourse_id": new}
        data |= _refs({"student": (STUDENT, sid), "newcourse": (COURSE, new)}, students, courses)
        return [BusinessEvent("change", data, stream)]
    if added:
        return [
            BusinessEvent(
                "enroll",
                {"student_id": sid, "course_id": cid}
                | _refs({"student": (STUDENT, sid), "course": (COURSE, cid)}, students, courses),
                stream,
            )
            for cid in added
        ]
    return [BusinessEvent("unenroll", {"student_id": sid, "course_id": c}, stream) for c in removed]


def _refs(fields: Mapping[str, tuple[str, int]], students: Rows, courses: Rows) -> dict[str, Any]:
    """Each field's row from the parts, or ``None`` and a lookup the handler resolves."""
    data: dict[str, Any] = {}
    lookup: dict[str, dict[str, Any]] = {}
    for name, (table, rid) in fields.items():
        row = (students if table == STUDENT else courses).get(rid)
        data[name] = row
        if row is None:
            lookup[name] = {"table": table, "id": rid}
    return data | {"lookup": lookup}
