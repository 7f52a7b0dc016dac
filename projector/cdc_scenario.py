"""A Debezium CDC log of a school database and an independent oracle of its views, for the
demo (``make demo``) and the tests (``tests/integration/test_cdc_school.py``).

The database has ``public.student(id, name, email, age)``, ``public.course(id, name, teacher,
room)`` and ``public.student_course(student_id, course_id)`` (composite primary key; foreign
keys to both). ``school_log`` simulates committed transactions against it and records what the
Debezium PostgreSQL connector (2.x/3.x, REPLICA IDENTITY DEFAULT, transaction metadata on)
publishes for each: one message per row change on the table's topic, in commit order, with
increasing LSNs. The facts it reproduces:
- ``source`` has ``lsn``, ``txId``, ``ts_ms`` (commit time), ``snapshot: "false"``, ``schema``,
  ``table``; ``transaction`` is ``{id: "<txId>:<lsn>", total_order, data_collection_order}``;
- an update's ``before`` is null; a delete's ``before`` holds the key with the other columns
  null, and is followed by a tombstone (null value, same key);
- an update of a primary key is a delete of the old key (and its tombstone) and a create of the
  new one, at the same LSN;
- message keys are the primary key as JSON; with ``envelope`` keys and values are wrapped in the
  JSON converter's ``{"schema", "payload"}``.

Business operations, each one transaction: enrol (insert a new student, insert a new course or
take an existing one, insert the student_course row), enrol an existing student, change course
(update student_course's course_id), update a student, change a course's teacher (and room),
unenrol, delete a student (its enrolments first, then the student).

``oracle`` folds the messages in log order as plain dictionaries (create/update: the row is
``after``; delete: gone) and computes the views from that: it shares nothing with the decoder,
the merge or the handler. ``transaction_records`` gives each transaction's BEGIN and END
records for Debezium's transaction topic, and ``business_oracle`` the business events a
correlation rule must name per transaction: it applies the rule to each transaction's changes
as a whole, in commit order, so it shares the decoder and the rule with projector, but none of
the windows, watermarks, storage or arrival order it is there to check.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from projector.core.correlate import BusinessEvent, BusinessRule, business_id
from projector.core.decode import load_decoder
from projector.core.event import Event
from projector.core.message import RawMessage

Row = dict[str, Any]

TABLES = ("student", "course", "student_course")
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "student": (("id", "int64"), ("name", "string"), ("email", "string"), ("age", "int32")),
    "course": (("id", "int64"), ("name", "string"), ("teacher", "string"), ("room", "string")),
    "student_course": (("student_id", "int64"), ("course_id", "int64")),
}
KEYS: dict[str, tuple[str, ...]] = {
    "student": ("id",),
    "course": ("id",),
    "student_course": ("student_id", "course_id"),
}

_FIRST = ("Jhon", "Ada", "Grace", "Linus", "Marlon", "Sam", "Mia", "Noor", "Ivo", "Lena", "Omar")
_LAST = ("Smith", "Lovelace", "Hopper", "Samuels", "Okafor", "Berg", "Rossi", "Tanaka", "Diaz")
_SUBJECTS = ("Physics", "Maths", "Chemistry", "Biology", "History", "Latin", "Music", "Art")
_TEACHERS = ("Foo", "Bar", "Curie", "Noether", "Turing", "Hypatia", "Euler", "Darwin", "Bach")
_SOURCE_FIELDS = (
    ("version", "string"),
    ("connector", "string"),
    ("name", "string"),
    ("ts_ms", "int64"),
    ("snapshot", "string"),
    ("db", "string"),
    ("sequence", "string"),
    ("schema", "string"),
    ("table", "string"),
    ("txId", "int64"),
    ("lsn", "int64"),
    ("xmin", "int64"),
)


@dataclass(frozen=True)
class Change:
    """One message on a table's topic: a change event, or (``payload`` None) the tombstone
    after a delete. ``lsn`` is the change's (the delete's, for a tombstone)."""

    table: str
    key: Row
    payload: Row | None
    lsn: int

    def wire(self, envelope: bool) -> tuple[bytes, bytes | None]:
        """The message's key and value bytes as the JSON converter writes them."""
        key: Any = self.key
        value: Any = self.payload
        if envelope:
            key = {"schema": key_schema(self.table), "payload": key}
            value = (
                None if value is None else {"schema": value_schema(self.table), "payload": value}
            )
        return json.dumps(key).encode(), None if value is None else json.dumps(value).encode()


@dataclass(frozen=True)
class Transaction:
    tx_id: int
    changes: tuple[Change, ...]


def commit_ms(tx: Transaction) -> int:
    """The transaction's commit time (``source.ts_ms``, the same on each of its changes)."""
    payload = next(c.payload for c in tx.changes if c.payload is not None)
    return int(payload["source"]["ts_ms"])


def transaction_records(tx: Transaction) -> list[tuple[bytes, bytes]]:
    """The transaction topic's BEGIN and END records of ``tx`` (key, value), as Debezium writes
    them with ``provide.transaction.metadata``: ids ``"<txId>:<lsn>"`` whose LSN differs
    between BEGIN and END, and END's change counts per ``schema.table``, tombstones left out."""
    counts: dict[str, int] = {}
    for c in tx.changes:
        if c.payload is not None:
            counts[f"public.{c.table}"] = counts.get(f"public.{c.table}", 0) + 1
    lsns = [c.lsn for c in tx.changes]
    begin_id, end_id = f"{tx.tx_id}:{min(lsns) - 8}", f"{tx.tx_id}:{max(lsns) + 8}"
    begin = {"status": "BEGIN", "id": begin_id, "ts_ms": commit_ms(tx), "event_count": None}
    end = {
        "status": "END",
        "id": end_id,
        "ts_ms": commit_ms(tx),
        "event_count": sum(counts.values()),
        "data_collections": [
            {"data_collection": name, "event_count": n} for name, n in sorted(counts.items())
        ],
    }
    return [(json.dumps({"id": r["id"]}).encode(), json.dumps(r).encode()) for r in (begin, end)]


def _field(name: str, type_: str, optional: bool) -> Row:
    return {"type": type_, "optional": optional, "field": name}


def _struct(name: str, fields: list[Row], optional: bool, **extra: Any) -> Row:
    return {"type": "struct", "fields": fields, "optional": optional, "name": name, **extra}


def key_schema(table: str) -> Row:
    fields = [_field(f, t, False) for f, t in COLUMNS[table] if f in KEYS[table]]
    return _struct(f"school.public.{table}.Key", fields, False)


def value_schema(table: str) -> Row:
    row = [_field(f, t, f not in KEYS[table]) for f, t in COLUMNS[table]]
    source = [_field(f, t, f in ("sequence", "txId", "lsn", "xmin")) for f, t in _SOURCE_FIELDS]
    block = [
        _field("id", "string", False),
        _field("total_order", "int64", False),
        _field("data_collection_order", "int64", False),
    ]
    value = f"school.public.{table}.Value"
    fields = [
        _struct(value, row, True, field="before"),
        _struct(value, row, True, field="after"),
        _struct("io.debezium.connector.postgresql.Source", source, False, field="source"),
        _field("op", "string", False),
        _field("ts_ms", "int64", True),
        _struct("event.block", block, True, version=1, field="transaction"),
    ]
    return _struct(f"school.public.{table}.Envelope", fields, False, version=1)


@dataclass
class _School:
    """The simulated database and the connector's position in its log."""

    rng: random.Random
    students: dict[int, Row] = field(default_factory=dict)
    courses: dict[int, Row] = field(default_factory=dict)
    enrolments: set[tuple[int, int]] = field(default_factory=set)
    next_student: int = 1
    next_course: int = 1
    lsn: int = 24_023_128
    tx_id: int = 570
    ts_ms: int = 1_700_000_000_000
    _changes: list[Change] = field(default_factory=list)
    _orders: dict[str, int] = field(default_factory=dict)

    # --- transactions ---------------------------------------------------------------------

    def begin(self) -> None:
        self.tx_id += self.rng.randint(1, 3)
        self.lsn += self.rng.randint(40, 400)  # BEGIN and whatever other databases wrote
        self.ts_ms += self.rng.randint(20, 5_000)
        self._changes, self._orders = [], {}

    def commit(self) -> Transaction:
        return Transaction(self.tx_id, tuple(self._changes))

    def emit(
        self, table: str, op: str, before: Row | None, after: Row | None, *, same_lsn: bool = False
    ) -> None:
        if not same_lsn:
            self.lsn += self.rng.randint(8, 120)
        row = after if after is not None else before
        assert row is not None
        self._orders[table] = self._orders.get(table, 0) + 1
        total = sum(self._orders.values())
        payload = {
            "before": before,
            "after": after,
            "source": {
                "version": "2.5.0.Final",
                "connector": "postgresql",
                "name": "school",
                "ts_ms": self.ts_ms,
                "snapshot": "false",
                "db": "school",
                "sequence": json.dumps([str(self.lsn - 56), str(self.lsn)], separators=(",", ":")),
                "schema": "public",
                "table": table,
                "txId": self.tx_id,
                "lsn": self.lsn,
                "xmin": None,
            },
            "op": op,
            "ts_ms": self.ts_ms + self.rng.randint(5, 900),
            "transaction": {
                "id": f"{self.tx_id}:{self.lsn}",
                "total_order": total,
                "data_collection_order": self._orders[table],
            },
        }
        key = {k: row[k] for k in KEYS[table]}
        self._changes.append(Change(table, key, payload, self.lsn))
        if op == "d":
            self._changes.append(Change(table, key, None, self.lsn))

    # --- row operations -------------------------------------------------------------------

    def insert_student(self) -> int:
        sid, self.next_student = self.next_student, self.next_student + 1
        first, last = self.rng.choice(_FIRST), self.rng.choice(_LAST)
        row = {
            "id": sid,
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{sid}@school.example",
            "age": self.rng.randint(17, 30),
        }
        self.students[sid] = row
        self.emit("student", "c", None, dict(row))
        return sid

    def insert_course(self) -> int:
        cid, self.next_course = self.next_course, self.next_course + 1
        row = {
            "id": cid,
            "name": f"{self.rng.choice(_SUBJECTS)} {100 + cid}",
            "teacher": self.rng.choice(_TEACHERS),
            "room": None if self.rng.random() < 0.2 else f"B-{self.rng.randint(100, 399)}",
        }
        self.courses[cid] = row
        self.emit("course", "c", None, dict(row))
        return cid

    def update_student(self, sid: int) -> None:
        row = self.students[sid]
        change = self.rng.choice(("name", "email", "age"))
        if change == "name":
            row["name"] = f"{self.rng.choice(_FIRST)} {self.rng.choice(_LAST)}"
        elif change == "email":
            row["email"] = None if self.rng.random() < 0.3 else f"s{sid}.{self.lsn}@mail.example"
        else:
            row["age"] += 1
        self.emit("student", "u", None, dict(row))

    def change_teacher(self, cid: int) -> None:
        row = self.courses[cid]
        row["teacher"] = self.rng.choice([t for t in _TEACHERS if t != row["teacher"]])
        if self.rng.random() < 0.3:
            row["room"] = f"C-{self.rng.randint(100, 399)}"
        self.emit("course", "u", None, dict(row))

    def enrol(self, sid: int, cid: int) -> None:
        self.enrolments.add((sid, cid))
        self.emit("student_course", "c", None, {"student_id": sid, "course_id": cid})

    def unenrol(self, sid: int, cid: int) -> None:
        self.enrolments.remove((sid, cid))
        self.emit("student_course", "d", {"student_id": sid, "course_id": cid}, None)

    def move(self, sid: int, old: int, new: int) -> None:
        """UPDATE student_course SET course_id = new: Debezium's delete + create, one LSN."""
        self.unenrol(sid, old)
        self.enrolments.add((sid, new))
        after = {"student_id": sid, "course_id": new}
        self.emit("student_course", "c", None, after, same_lsn=True)

    def delete_student(self, sid: int) -> None:
        for s, c in sorted(self.enrolments):
            if s == sid:
                self.unenrol(s, c)
        del self.students[sid]
        self.emit("student", "d", {"id": sid, "name": None, "email": None, "age": None}, None)


def school_log(
    rng: random.Random, students: int = 50, courses: int = 10, changes: int = 200
) -> list[Transaction]:
    """Committed transactions until at least ``changes`` row changes (tombstones not counted),
    creating up to ``students`` students and ``courses`` courses."""
    db = _School(rng)
    log: list[Transaction] = []
    count = 0
    while count < changes:
        db.begin()
        _business_operation(db, students, courses)
        tx = db.commit()
        log.append(tx)
        count += sum(1 for c in tx.changes if c.payload is not None)
    return log


def _business_operation(db: _School, max_students: int, max_courses: int) -> None:
    """One transaction's worth: an operation picked by weight among those possible now."""
    rng = db.rng
    students, courses, enrolled = sorted(db.students), sorted(db.courses), sorted(db.enrolments)
    free = [(s, c) for s in students for c in courses if (s, c) not in db.enrolments]
    movable = [(s, c) for s, c in enrolled if any((s, o) not in db.enrolments for o in courses)]
    with_courses = sorted({s for s, _ in enrolled}) or students
    ops: list[tuple[float, Callable[[], None]]] = [
        (6.0 if db.next_student <= max_students else 0.0, lambda: _enrol_new(db, max_courses)),
        (2.0 if free else 0.0, lambda: db.enrol(*rng.choice(free))),
        (1.5 if movable else 0.0, lambda: _move(db, *rng.choice(movable))),
        (2.0 if students else 0.0, lambda: db.update_student(rng.choice(students))),
        (0.4 if students else 0.0, lambda: db.delete_student(rng.choice(with_courses))),
        (1.0 if courses else 0.0, lambda: db.change_teacher(rng.choice(courses))),
        (1.2 if enrolled else 0.0, lambda: db.unenrol(*rng.choice(enrolled))),
    ]
    weights, actions = zip(*ops, strict=True)
    rng.choices(actions, weights)[0]()


def _enrol_new(db: _School, max_courses: int) -> None:
    """Insert a student, a new course or take an existing one, and enrol the one in the other."""
    sid = db.insert_student()
    new_course = db.next_course <= max_courses and (not db.courses or db.rng.random() < 0.4)
    db.enrol(sid, db.insert_course() if new_course else db.rng.choice(sorted(db.courses)))


def _move(db: _School, sid: int, old: int) -> None:
    targets = [c for c in sorted(db.courses) if (sid, c) not in db.enrolments]
    db.move(sid, old, db.rng.choice(targets))


# --- delivery --------------------------------------------------------------------------------


def by_table(log: Iterable[Transaction]) -> dict[str, list[Change]]:
    """Each table's messages in commit order: what its topic holds."""
    out: dict[str, list[Change]] = {t: [] for t in TABLES}
    for tx in log:
        for change in tx.changes:
            out[change.table].append(change)
    return out


def redelivered(rng: random.Random, changes: Sequence[Change], fraction: float) -> list[Change]:
    """``changes`` shuffled, with ``fraction`` of them delivered again at random places and as
    many of the older half again at the very end (stale re-deliveries after the newest)."""
    out = list(changes)
    rng.shuffle(out)
    extra = max(1, int(len(changes) * fraction))
    for change in rng.choices(changes, k=extra):
        out.insert(rng.randint(0, len(out)), change)
    older = sorted(changes, key=lambda c: c.lsn)[: max(1, len(changes) // 2)]
    return out + rng.choices(older, k=extra)


def publish_changes(bootstrap: str, topic: str, changes: Iterable[Change], envelope: bool) -> int:
    """Publish in the given order, keyed by primary key (a row stays on one partition)."""
    return publish_topics(bootstrap, {topic: changes}, envelope)


def publish_topics(
    bootstrap: str, per_topic: Mapping[str, Iterable[Change]], envelope: bool
) -> int:
    """``publish_changes`` for several topics with one producer (a producer's first message
    costs about half a second)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    count = 0
    for topic, changes in per_topic.items():
        for change in changes:
            key, value = change.wire(envelope)
            producer.produce(topic, value=value, key=key)
            producer.poll(0)
            count += 1
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not publish every message to {', '.join(per_topic)}")
    return count


# --- the oracle ------------------------------------------------------------------------------


@dataclass
class SchoolState:
    """The source tables, as the oracle folded them."""

    students: dict[int, Row] = field(default_factory=dict)
    courses: dict[int, Row] = field(default_factory=dict)
    enrolments: dict[tuple[int, int], Row] = field(default_factory=dict)

    def table_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Each view table's rows, sorted, as ``select <columns> ... order by <key>`` gives."""
        return {
            "students": _rows(self.students, COLUMNS["student"]),
            "courses": _rows(self.courses, COLUMNS["course"]),
            "enrolments": sorted(self.enrolments),
        }

    def enrolment_view(self) -> list[tuple[Any, ...]]:
        """(student_id, student_name, course_id, course_name, teacher) for every enrolment
        whose student and course exist, sorted."""
        return sorted(
            (s, self.students[s]["name"], c, self.courses[c]["name"], self.courses[c]["teacher"])
            for s, c in self.enrolments
            if s in self.students and c in self.courses
        )

    def student_courses(self) -> list[tuple[Any, ...]]:
        """(student_id, student_name, [{course_id, course_name, teacher}...]) per student."""
        view = self.enrolment_view()
        return [
            (
                sid,
                row["name"],
                [
                    {"course_id": c, "course_name": cn, "teacher": t}
                    for s, _, c, cn, t in view
                    if s == sid
                ],
            )
            for sid, row in sorted(self.students.items())
        ]


def _rows(table: dict[int, Row], columns: Sequence[tuple[str, str]]) -> list[tuple[Any, ...]]:
    return [tuple(row[c] for c, _ in columns) for _, row in sorted(table.items())]


def oracle(log: Iterable[Transaction]) -> SchoolState:
    """The tables after applying ``log``'s messages in order: plain dictionaries."""
    state = SchoolState()
    tables: dict[str, dict[Any, Row]] = {
        "student": state.students,
        "course": state.courses,
        "student_course": state.enrolments,
    }
    for tx in log:
        for change in tx.changes:
            if change.payload is None:
                continue  # a tombstone says nothing a delete did not
            key_values = tuple(change.key[k] for k in KEYS[change.table])
            key = key_values[0] if len(key_values) == 1 else key_values
            if change.payload["op"] == "d":
                tables[change.table].pop(key, None)
            else:
                tables[change.table][key] = dict(change.payload["after"])
    return state


def business_oracle(
    log: Iterable[Transaction], name: str, rule: BusinessRule
) -> list[tuple[str, str]]:
    """(id, type) of every business event ``rule`` names on each transaction's changes, as
    the Debezium decoder gives them, with the ids the correlation derives (``name``, the
    transaction id, the changes' event ids): what a correlation over the three tables keyed by
    the transaction must name, whatever the order its parts arrive in."""
    decoder = load_decoder("debezium", {})
    out: list[tuple[str, str]] = []
    for tx in log:
        parts: dict[str, list[Event]] = {}
        for c in tx.changes:
            key, value = c.wire(envelope=False)
            event = decoder.decode(RawMessage(c.table, 0, 0, key, value))
            if event is not None:
                parts.setdefault(c.table, []).append(event)
        ordered = {n: sorted(evs, key=lambda e: (e.ts or 0, e.id)) for n, evs in parts.items()}
        first = business_id(name, str(tx.tx_id), (e.id for evs in parts.values() for e in evs))
        named = rule(ordered)
        events = [] if named is None else [named] if isinstance(named, BusinessEvent) else named
        out += [(first if i == 0 else f"{first}.{i}", b.type) for i, b in enumerate(events)]
    return out
