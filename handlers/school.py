"""Students, courses and enrolments from Debezium CDC (the seed's STUDENT / COURSE /
STUDENT_COURSE question), as a merge-mode handler.

Configure one merge projection over the three change topics (``public.student``,
``public.course``, ``public.student_course``) with the Debezium decoder and its defaults: the
stream is ``<table>:<primary key>`` (``student:42``, ``course:7``, ``student_course:42,7``) and
the timestamp is the change's LSN. Do not set the decoder's ``stream_prefix``: this handler
dispatches on it.

The approach, in two steps:
1. Rows merged per table by LSN. Each row is one merge document: every field keeps the value of
   the newest LSN, a delete (``op: d``) removes the document and is kept as a tombstone, so a
   stale or re-delivered older change never overwrites or resurrects anything. The handler only
   mirrors each changed document into a plain table of the view schema (``students``,
   ``courses``, ``enrolments``): an upsert per present document, a delete per removed one, one
   ``executemany`` per table and kind for the whole batch.
2. Joins in SQL. ``enrolment_view`` and ``student_courses`` are SQL views over those tables, so
   they are computed when read, never stored.

Why this is order-independent: each table row is a function of that row's own changes only
(the newest LSN per field wins, whatever the arrival order, batching or duplication), and the
views are a function of the three tables at read time. So there is no cross-table state to get
wrong: a course's new teacher shows on every enrolment of that course at once, and a student's
deletion hides its enrolments even before their own deletes arrive.

The views: ``enrolment_view(student_id, student_name, course_id, course_name, teacher)``, one
row per enrolment; ``student_courses(student_id, student_name, courses)``, one row per student
with ``courses`` a JSONB array of ``{course_id, course_name, teacher}`` ordered by course id
(``[]`` for a student with none).

The decision on partial data: ``enrolment_view`` is an inner join, so an enrolment shows only
once its student and its course rows are both there (the source database's foreign keys hold for
every committed state, so after a full catch-up nothing is hidden). While the topics are
consumed at different speeds it never shows half an enrolment with null names; the raw
``enrolments`` table holds every enrolment row. The view tables have no foreign keys for the
same reason: their rows arrive in any order. What the views do not give is transaction
atomicity: the rows of one source transaction arrive on three topics (and partitions), so a
reader can briefly see part of it (a course change's delete without its create); holding them
back would take Debezium's transaction metadata topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from projector.apply import DocumentChange, PgView

MIGRATIONS = [
    "create table students (id bigint primary key, name text, email text, age integer)",
    "create table courses (id bigint primary key, name text, teacher text, room text)",
    """
    create table enrolments (
        student_id bigint not null,
        course_id bigint not null,
        primary key (student_id, course_id)
    )
    """,
    "create index enrolments_course_id on enrolments (course_id)",
    """
    create view enrolment_view as
    select e.student_id, s.name as student_name, e.course_id, c.name as course_name, c.teacher
    from enrolments e
    join students s on s.id = e.student_id
    join courses c on c.id = e.course_id
    """,
    """
    create view student_courses as
    select s.id as student_id, s.name as student_name,
        coalesce(
            jsonb_agg(
                jsonb_build_object(
                    'course_id', v.course_id, 'course_name', v.course_name, 'teacher', v.teacher
                )
                order by v.course_id
            ) filter (where v.course_id is not null),
            '[]'::jsonb
        ) as courses
    from students s
    left join enrolment_view v on v.student_id = s.id
    group by s.id, s.name
    """,
]


@dataclass(frozen=True)
class Table:
    """A view table that mirrors one source table: its name, key columns and all columns
    (key first)."""

    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]

    @property
    def upsert(self) -> str:
        values = ", ".join(["%s"] * len(self.columns))
        rest = [c for c in self.columns if c not in self.key]
        action = (
            "do update set " + ", ".join(f"{c} = excluded.{c}" for c in rest)
            if rest
            else "do nothing"
        )
        return (
            f"insert into {self.name} ({', '.join(self.columns)}) values ({values})"
            f" on conflict ({', '.join(self.key)}) {action}"
        )

    @property
    def delete(self) -> str:
        return f"delete from {self.name} where " + " and ".join(f"{c} = %s" for c in self.key)


# By stream prefix, i.e. the source table's name (Debezium's source.table).
TABLES = {
    "student": Table("students", ("id",), ("id", "name", "email", "age")),
    "course": Table("courses", ("id",), ("id", "name", "teacher", "room")),
    "student_course": Table("enrolments", ("student_id", "course_id"), ("student_id", "course_id")),
}


def handle_documents(changes: Sequence[DocumentChange], view: PgView) -> None:
    """Mirror a batch's changed rows: per table one delete and one upsert ``executemany``."""
    upserts: dict[str, list[tuple[Any, ...]]] = {prefix: [] for prefix in TABLES}
    deletes: dict[str, list[tuple[Any, ...]]] = {prefix: [] for prefix in TABLES}
    for change in changes:
        prefix = table_of(change.stream)
        table = TABLES[prefix]
        key = _key(table, change)
        if change.document is None:
            deletes[prefix].append(key)
        else:
            rest = table.columns[len(key) :]
            upserts[prefix].append(key + tuple(change.document.get(c) for c in rest))
    for prefix, table in TABLES.items():
        # Sorted by key so that concurrent writers lock rows in one order.
        if deletes[prefix]:
            view.executemany(table.delete, sorted(deletes[prefix]))
        if upserts[prefix]:
            width = len(table.key)
            rows: list[tuple[Any, ...]] = sorted(upserts[prefix], key=lambda r: r[:width])
            view.executemany(table.upsert, rows)


def table_of(stream: str) -> str:
    """The source table a stream belongs to: its prefix before ':'."""
    prefix, sep, _ = stream.partition(":")
    if not sep or prefix not in TABLES:
        raise ValueError(
            f"stream {stream!r} is not a row of {', '.join(TABLES)}: is the Debezium decoder's"
            " stream_prefix left at its default (the table name)?"
        )
    return prefix


def _key(table: Table, change: DocumentChange) -> tuple[Any, ...]:
    """The row's key: from the document, or for a deleted row from its events (a delete's
    data is the key-only ``before``; every create or update carries the whole row)."""
    data = change.document if change.document is not None else change.events[-1].data
    key = tuple(data.get(c) for c in table.key)
    if any(v is None for v in key):
        raise ValueError(f"{change.stream}: no {', '.join(table.key)} in {data!r}")
    return key
