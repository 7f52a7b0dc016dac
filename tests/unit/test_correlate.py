"""The correlation core: one database transaction's row changes, arriving on several topics in
any order, twice, or late, become the same business events, with the same ids, however they
are ordered and batched; and the watermark that closes windows in event time.

Events are made by the real Debezium decoder from Debezium-shaped messages, so the fields the
correlation reads (``meta.table``, ``meta.tx_id``, ``meta.ts_ms``) are the ones it will see.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise, permutations
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.school_correlation import name_business_events
from projector.core.correlate import (
    BusinessEvent,
    CorrelationPlan,
    CorrelationRules,
    InputTime,
    Part,
    Pending,
    business_id,
    correlate,
    correlation_key,
    input_time,
    watermark,
)
from projector.core.decode.debezium import DebeziumDecoder, DebeziumOptions
from projector.core.event import Event
from projector.core.message import RawMessage

T0 = 1_700_000_000_000  # commit times are epoch ms
WINDOW = 10_000
DECODER = DebeziumDecoder(DebeziumOptions())
KEYS = {"student": ("id",), "course": ("id",), "student_course": ("student_id", "course_id")}
PARTS = tuple(Part(table, f"public.{table}") for table in KEYS)
OPS = {"create": "c", "update": "u", "delete": "d", "read": "r"}


def rules(**overrides: Any) -> CorrelationRules:
    settings: dict[str, Any] = {"window": WINDOW, "parts": PARTS, "rule": name_business_events}
    return CorrelationRules(name="school", **(settings | overrides))


NO_TX_META = rules()
TX_META = rules(transaction_metadata=True)


def row(
    table: str,
    op: str,
    data: dict[str, Any],
    tx: int,
    lsn: int,
    ts_ms: int | None = T0,
    snapshot: str = "false",
) -> Event:
    """A Debezium change of ``table`` in transaction ``tx``, decoded."""
    source = {
        "connector": "postgresql",
        "ts_ms": ts_ms,
        "snapshot": snapshot,
        "db": "school",
        "schema": "public",
        "table": table,
        "txId": tx,
        "lsn": lsn,
    }
    payload = {
        "before": data if op == "delete" else None,
        "after": None if op == "delete" else data,
        "source": source,
        "op": OPS[op],
        "ts_ms": (ts_ms or T0) + 7,
        # Snapshot rows belong to no transaction: Debezium gives them no transaction block.
        "transaction": None
        if snapshot != "false"
        else {"id": f"{tx}:{lsn}", "total_order": 1, "data_collection_order": 1},
    }
    key = {k: data[k] for k in KEYS.get(table, ("id",))}
    return _decode(f"school.public.{table}", key, payload)


def end(tx: int, counts: Mapping[str, int], lsn: int = 99_999, ts_ms: int = T0) -> Event:
    """The Debezium END record of transaction ``tx``: events per ``schema.table``."""
    payload = {
        "status": "END",
        "id": f"{tx}:{lsn}",
        "ts_ms": ts_ms,
        "event_count": sum(counts.values()),
        "data_collections": [
            {"data_collection": table, "event_count": n} for table, n in counts.items()
        ],
    }
    return _decode("school.transaction", {"id": f"{tx}:{lsn}"}, payload)


def _decode(topic: str, key: Any, payload: Any) -> Event:
    message = RawMessage(topic, 0, 0, json.dumps(key).encode(), json.dumps(payload).encode())
    event = DECODER.decode(message)
    assert event is not None
    return event


STUDENT = {"id": 1, "name": "Jhon", "email": "jhon@school.example", "age": 20}
COURSE = {"id": 7, "name": "Physics", "teacher": "Foo", "room": "B-101"}
LINK = {"student_id": 1, "course_id": 7}


def enrolment(tx: int = 571, ts_ms: int = T0) -> list[Event]:
    """The seed's enrolment: a new student, a new course and the link, in one transaction."""
    return [
        row("student", "create", STUDENT, tx, 100, ts_ms),
        row("course", "create", COURSE, tx, 200, ts_ms),
        row("student_course", "create", LINK, tx, 300, ts_ms),
    ]


ENROLMENT_END = {"public.student": 1, "public.course": 1, "public.student_course": 1}


# --- a store, as the runner will use it -------------------------------------------------------


@dataclass
class Store:
    """Records kept as JSON by key, loaded as the runner will load them: those of the batch's
    keys, and those whose ``due`` the watermark has reached."""

    rules: CorrelationRules
    rows: dict[str, str] = field(default_factory=dict)
    plans: list[CorrelationPlan] = field(default_factory=list)

    def batch(self, events: Sequence[Event], mark: int | None = None) -> CorrelationPlan:
        plan = correlate(self.load(events, mark), events, mark, self.rules)
        for record in plan.write:
            self.rows[record.key] = json.dumps(record.to_json())
        for key in plan.delete:
            del self.rows[key]
        self.plans.append(plan)
        return plan

    def load(self, events: Sequence[Event], mark: int | None) -> dict[str, Pending]:
        keys = {correlation_key(e, self.rules) for e in events}
        records = {key: Pending.from_json(json.loads(raw)) for key, raw in self.rows.items()}
        return {
            key: record
            for key, record in records.items()
            if key in keys or _due(record.due(self.rules), mark)
        }

    @property
    def business(self) -> list[Event]:
        return sorted((e for p in self.plans for e in p.business), key=lambda e: e.id)

    @property
    def late(self) -> list[Event]:
        return [e for p in self.plans for e in p.late]


def _due(due: int | None, mark: int | None) -> bool:
    return due is not None and mark is not None and due <= mark


def summary(events: Iterable[Event]) -> list[tuple[str, str, str, int | None, str]]:
    """What a consumer of business events sees: id, type, stream, ts and data."""
    return sorted(
        (e.id, e.type, e.stream, e.ts, json.dumps(e.data, sort_keys=True)) for e in events
    )


FAR = T0 + 1000 * WINDOW  # a watermark past every window of these tests (not their retention)


# --- the seed's enrolment ---------------------------------------------------------------------


def test_enrolment_in_all_six_orders_is_one_enroll_with_one_id() -> None:
    """Proves the seed's case: STUDENT, COURSE and STUDENT_COURSE of one transaction, in any
    of the 6 orders, in one batch or one event per batch, give one ``enroll`` carrying the
    student and the course, with one id; without transaction metadata it closes as soon as
    the third part is in, with no watermark needed."""
    results = set()
    for order in permutations(enrolment()):
        single = correlate({}, order, None, NO_TX_META)
        store = Store(NO_TX_META)
        for event in order:
            store.batch([event])
        assert summary(store.business) == summary(single.business)
        assert [len(p.business) for p in store.plans] == [0, 0, 1]
        results.add(tuple(summary(single.business)))
    (only,) = results
    (enroll,) = single.business
    assert (enroll.type, enroll.stream) == ("enroll", "student:1")
    assert enroll.data == {
        "student_id": 1,
        "course_id": 7,
        "student": STUDENT,
        "course": COURSE,
        "lookup": {},
    }
    assert enroll.id == business_id("school", "571", [e.id for e in enrolment()])
    assert (enroll.ts, enroll.meta["closed"]) == (T0, "complete")
    assert len(only) == 1


def test_enrolment_with_its_end_record_in_all_24_orders_completes_at_once() -> None:
    """Proves that with transaction metadata the END record's counts complete the window,
    whichever of the four records comes last, and the id does not depend on it."""
    events = [*enrolment(), end(571, ENROLMENT_END)]
    expected = summary(correlate({}, enrolment(), None, NO_TX_META).business)
    for order in permutations(events):
        store = Store(TX_META)
        for event in order:
            store.batch([event])
        assert summary(store.business) == expected
        assert [len(p.business) for p in store.plans] == [0, 0, 0, 1]
        record = Pending.from_json(_record(store))
        assert not record.parts and len(record.closed) == 1


def _key(store: Store) -> str:
    (key,) = store.rows
    return key


def _record(store: Store) -> dict[str, Any]:
    return dict(json.loads(store.rows[_key(store)]))


def test_with_transaction_metadata_the_parts_wait_for_the_end_record() -> None:
    """Proves that with transaction metadata three parts are not enough (the transaction may
    hold more): without the END record the window waits for the watermark, then expires with
    the same business event, marked as not counted."""
    store = Store(TX_META)
    assert store.batch(enrolment(), T0 + WINDOW - 1).business == ()
    plan = store.batch([], T0 + WINDOW)
    (enroll,) = plan.business
    assert (enroll.type, enroll.meta["closed"], enroll.meta["counted"]) == (
        "enroll",
        "expired",
        False,
    )


def test_end_record_before_the_parts_waits_for_them() -> None:
    """Proves an END record that comes first opens the correlation, holds its counts, and the
    window completes when the last counted part arrives."""
    store = Store(TX_META)
    assert store.batch([end(571, ENROLMENT_END)]).write
    assert store.batch(enrolment()[:2]).business == ()
    (enroll,) = store.batch(enrolment()[2:]).business
    assert enroll.meta["counted"] is True


def test_end_record_counts_only_the_correlated_tables() -> None:
    """Proves a transaction that also wrote tables the projection does not consume completes
    on the correlated tables' counts; an END record of a transaction on other tables only is
    skipped and stores nothing (the transaction topic carries every transaction)."""
    counts = {**ENROLMENT_END, "public.audit_log": 5}
    plan = correlate({}, [*enrolment(), end(571, counts)], None, TX_META)
    assert [e.type for e in plan.business] == ["enroll"]
    other = correlate({}, [end(572, {"public.audit_log": 2})], None, TX_META)
    assert (other.write, [s.reason for s in other.skipped]) == ((), ["not_a_part"])


def test_expired_transaction_reports_the_parts_its_end_record_counted_but_never_came() -> None:
    """Proves a transaction whose COURSE change never arrives expires at its deadline with
    what came, and names what is missing, for the metrics and the log."""
    events = [*enrolment()[::2], end(571, ENROLMENT_END)]
    plan = correlate({}, events, T0 + WINDOW, TX_META)
    (closed,) = plan.closed
    assert (closed.reason, dict(closed.missing)) == ("expired", {"course": 1})
    (enroll,) = plan.business
    assert enroll.data["course"] is None
    assert enroll.data["lookup"] == {"course": {"table": "course", "id": 7}}


# --- partial transactions ---------------------------------------------------------------------


def test_parts_outside_the_window_are_named_one_by_one_in_every_order() -> None:
    """Proves that parts of one key more than a window apart are separate windows, cut from
    the earliest whatever the arrival order: the student's update, the course's update and
    the student's move to course 7 (a STUDENT_COURSE update) are three partial events."""
    events = [
        row("student", "update", STUDENT, 900, 100, T0),
        row("course", "update", COURSE, 900, 200, T0 + WINDOW + 1),
        row("student_course", "update", LINK, 900, 300, T0 + 3 * WINDOW),
    ]
    expected = None
    for order in permutations(events):
        store = Store(NO_TX_META)
        for event in order:
            store.batch([event])
        store.batch([], FAR)
        expected = expected or summary(store.business)
        assert summary(store.business) == expected
    assert sorted((ts, t, s) for _, t, s, ts, _ in expected or []) == [
        (T0, "update", "student:1"),
        (T0 + WINDOW + 1, "update", "course:7"),
        (T0 + 3 * WINDOW, "change", "student:1"),
    ]


def test_one_part_alone_waits_for_its_window_then_is_an_update() -> None:
    """Proves a lone STUDENT change is held (durably: the plan writes it) until the watermark
    reaches its deadline, and is then an ``update``; its record's due time is that deadline,
    so the runner loads it when the watermark gets there without any new part."""
    store = Store(NO_TX_META)
    plan = store.batch([row("student", "update", STUDENT, 580, 100)], T0 + WINDOW - 1)
    (record,) = plan.write
    assert (plan.business, record.deadline(NO_TX_META)) == ((), T0 + WINDOW)
    assert record.due(NO_TX_META) == T0 + WINDOW
    (update,) = store.batch([], T0 + WINDOW).business
    assert (update.type, update.data, update.stream) == (
        "update",
        {"student": STUDENT},
        "student:1",
    )


def test_a_course_change_is_named_change_and_asks_for_the_new_course() -> None:
    """Proves Debezium's form of a moved enrolment (an update of STUDENT_COURSE's primary key
    is a delete of the old row and a create of the new one, at one LSN) is one ``change``,
    and that the student and new course, which the transaction did not touch, are left for the
    handler to look up in the view."""
    moved = [
        row("student_course", "delete", {"student_id": 1, "course_id": 3}, 590, 400),
        row("student_course", "create", LINK, 590, 400),
    ]
    plan = correlate({}, [*moved, end(590, {"public.student_course": 2})], None, TX_META)
    (change,) = plan.business
    assert change.type == "change"
    assert change.data == {
        "student_id": 1,
        "oldcourse_id": 3,
        "newcourse_id": 7,
        "student": None,
        "newcourse": None,
        "lookup": {
            "student": {"table": "student", "id": 1},
            "newcourse": {"table": "course", "id": 7},
        },
    }


def test_two_enrolments_in_one_transaction_are_two_events_with_distinct_stable_ids() -> None:
    """Proves a rule may name several business events for one correlation: each gets its own
    id, the first the correlation's id, and the ids are the same for any arrival order."""
    events = [
        row("student", "create", STUDENT, 600, 100),
        row("student_course", "create", {"student_id": 1, "course_id": 7}, 600, 200),
        row("student_course", "create", {"student_id": 1, "course_id": 8}, 600, 300),
        end(600, {"public.student": 1, "public.student_course": 2}),
    ]
    ids = {
        tuple(e.id for e in correlate({}, o, None, TX_META).business) for o in permutations(events)
    }
    ((first, second),) = ids
    assert first == business_id("school", "600", [e.id for e in events[:3]])
    assert second == f"{first}.1"


# --- duplicates and late parts ----------------------------------------------------------------


def test_duplicates_in_a_batch_and_across_batches_change_nothing() -> None:
    """Proves that every part delivered twice in one batch and again after the window closed
    (Debezium re-sends after a connector restart) names the same single event: the
    re-deliveries are duplicates, not late parts, and write nothing."""
    store = Store(NO_TX_META)
    first = store.batch(enrolment() * 2)
    again = store.batch(enrolment() + list(reversed(enrolment())), FAR)
    assert (first.duplicates, again.duplicates) == (3, 6)
    assert [e.type for e in store.business] == ["enroll"]
    assert (again.late, again.write, again.closed) == ((), (), ())


def test_a_late_part_of_a_closed_transaction_is_reported_not_named() -> None:
    """Proves the late-part decision: once a transaction's window has closed (here expired
    with only its STUDENT change, named ``update``), a part of it that arrives after is late:
    reported in the plan for the runner to count and log, no second, partial business event,
    no new correlation. Its re-delivery is late again, never named."""
    store = Store(NO_TX_META)
    student, course, link = enrolment()
    store.batch([student], T0 + WINDOW)
    assert [e.type for e in store.business] == ["update"]
    for _ in range(2):
        plan = store.batch([course, link], T0 + WINDOW + 5)
        assert (plan.late, plan.write, plan.business) == ((course, link), (), ())
    assert store.batch([student]).duplicates == 1


def test_closed_windows_are_forgotten_after_the_retention() -> None:
    """Proves a closed window is remembered for ``closed_retention`` of event time (so its
    re-deliveries are duplicates) and then deleted: the store does not grow with every
    transaction ever seen. A re-delivery older than that opens a new correlation: the
    documented trade-off, as merge's ``tombstone_retention``."""
    short = rules(closed_retention=60_000)
    store = Store(short)
    store.batch(enrolment())
    until = T0 + WINDOW
    assert Pending.from_json(_record(store)).due(short) == until + 60_000
    assert store.batch([], until + 59_999).delete == ()
    assert store.batch([], until + 60_000).delete == ("571",)
    assert store.rows == {}
    assert [e.type for e in store.batch(enrolment()).business] == ["enroll"]


# --- what the correlation does not take -------------------------------------------------------


def test_events_without_key_time_or_part_are_skipped_with_a_reason() -> None:
    """Proves snapshot rows (no transaction), a change without a commit time, a table that is
    not a part and BEGIN records are skipped with their reason, and store nothing."""
    events = [
        row("student", "read", STUDENT, 1, 100, snapshot="true"),
        row("student", "update", STUDENT, 2, 110, ts_ms=None),
        row("audit_log", "create", {"id": 1}, 3, 120),
        _begin(),
    ]
    plan = correlate({}, events, FAR, TX_META)
    reasons = sorted(s.reason for s in plan.skipped)
    assert reasons == ["no_key", "no_time", "not_a_part", "not_a_part"]
    assert (plan.write, plan.closed) == ((), ())


def _begin() -> Event:
    payload = {"status": "BEGIN", "id": "571:50", "ts_ms": T0, "event_count": None}
    return _decode("school.transaction", {"id": "571:50"}, payload | {"data_collections": None})


def test_a_failing_rule_is_reported_and_closes_the_window() -> None:
    """Proves a rule that raises (user code) does not stop the batch: the closed window
    carries the error for the runner to dead-letter its parts, and is closed, so its parts
    are not correlated twice; a rule returning something else than business events is the
    same error."""

    def broken(parts: Mapping[str, Sequence[Event]]) -> BusinessEvent | None:
        raise KeyError("teacher")

    def wrong(parts: Mapping[str, Sequence[Event]]) -> Any:
        return {"type": "enroll"}

    for rule in (broken, wrong):
        store = Store(rules(rule=rule))
        (closed,) = store.batch(enrolment()).closed
        assert closed.business == () and closed.error and "571" in closed.error
        assert store.batch(enrolment()).duplicates == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"window": 0}, "correlation.window must be a positive duration"),
        ({"parts": ()}, "correlation.parts must name at least one part"),
        ({"parts": (*PARTS, Part("student", "public.x"))}, "correlation.parts names a part twice"),
        ({"parts": (*PARTS, Part("x", "public.student"))}, "correlation.parts lists a source"),
        ({"key": "tx_id"}, "correlation.key must be a path such as meta.tx_id"),
        ({"time": "data."}, "correlation.time must be a path"),
        ({"complete_when": frozenset({"teacher"})}, "correlation.complete_when names parts"),
        ({"transaction_metadata": True, "key": "data.id"}, "correlation.transaction_metadata"),
        (
            {"transaction_metadata": True, "complete_when": frozenset()},
            "correlation.complete_when does not apply",
        ),
        ({"parts": (Part("s", "public.s", key="id"),)}, "correlation.parts.s.key must be"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(overrides: dict[str, Any], message: str) -> None:
    """Proves a bad correlation config is refused with a message that names its key."""
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        rules(**overrides)


def test_field_path_keys_per_part_correlate_rows_that_share_a_column() -> None:
    """Proves the alternative to transaction ids: a configured field path per part (a STUDENT
    row by ``data.id``, a STUDENT_COURSE row by ``data.student_id``) correlates the changes of
    one student within a window."""
    by_student = rules(
        key="data.id",
        parts=(
            Part("student", "public.student"),
            Part("student_course", "public.student_course", key="data.student_id"),
        ),
        complete_when=frozenset({"student", "student_course"}),
    )
    events = [
        row("student", "create", STUDENT, 1, 100),
        row("student_course", "create", LINK, 2, 200),
    ]
    (enroll,) = correlate({}, events, None, by_student).business
    assert (enroll.type, enroll.data["lookup"]) == (
        "enroll",
        {"course": {"table": "course", "id": 7}},
    )


# --- the watermark ----------------------------------------------------------------------------


def test_watermark_is_the_lowest_input_and_a_lagging_input_holds_it() -> None:
    """Proves the watermark is the lowest input's high: the STUDENT topic read far ahead does
    not expire windows whose STUDENT_COURSE parts are still unread on a lagging input."""
    assert watermark([InputTime(T0 + 60_000), InputTime(T0)]) == T0
    assert watermark([InputTime(T0 + 60_000), InputTime(None)]) is None
    assert watermark([InputTime(T0), InputTime(T0 + 5)], lateness=1_000) == T0 - 1_000


def test_watermark_never_goes_back_and_ignores_empty_caught_up_inputs() -> None:
    """Proves the watermark is monotonic (a rebalance handing an input back with an older
    stored high does not reopen anything) and that an empty, caught-up partition holds
    nothing back, while an unread one holds it unset."""
    assert watermark([InputTime(T0)], previous=T0 + 9) == T0 + 9
    assert watermark([InputTime(None, caught_up=True), InputTime(T0)]) == T0
    assert watermark([InputTime(None, caught_up=True)], previous=T0) == T0
    assert watermark([], previous=None) is None


def test_idle_inputs_advance_with_the_runner_clock_only_when_caught_up() -> None:
    """Proves the idle rule: a caught-up input's high is raised to ``now - idle_after`` (the
    runner's clock, passed in), so a last lone change closes while the topics are quiet; an
    input with unread messages never moves by the clock; ``idle_after`` unset is strict
    event time."""
    now = T0 + 120_000
    assert input_time(T0, True, idle_after=30_000, now=now) == InputTime(now - 30_000, True)
    assert input_time(None, True, idle_after=30_000, now=now) == InputTime(now - 30_000, True)
    assert input_time(T0, False, idle_after=30_000, now=now) == InputTime(T0, False)
    assert input_time(now, True, idle_after=30_000, now=now) == InputTime(now, True)
    assert input_time(T0, True, idle_after=None, now=now) == InputTime(T0, True)


def test_importing_the_correlation_core_loads_no_driver() -> None:
    """Proves the correlation core is pure: importing it loads no Kafka, database or metrics
    driver."""
    code = (
        "import sys, projector.core.correlate; "
        "bad = [m for m in ('confluent_kafka', 'psycopg', 'redis', 'prometheus_client') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- properties -------------------------------------------------------------------------------

# A transaction's shape: its row changes as (table, op, data).
SHAPES: dict[str, Callable[[int], list[tuple[str, str, dict[str, Any]]]]] = {
    "enrol_new": lambda i: [
        ("student", "create", {"id": i, "name": f"s{i}"}),
        ("course", "create", {"id": 100 + i, "name": f"c{i}"}),
        ("student_course", "create", {"student_id": i, "course_id": 100 + i}),
    ],
    "enrol_existing": lambda i: [
        ("student", "create", {"id": i, "name": f"s{i}"}),
        ("student_course", "create", {"student_id": i, "course_id": 7}),
    ],
    "move": lambda i: [
        ("student_course", "delete", {"student_id": i, "course_id": 7}),
        ("student_course", "create", {"student_id": i, "course_id": 8}),
    ],
    "update_student": lambda i: [("student", "update", {"id": i, "name": f"n{i}"})],
    "update_course": lambda i: [("course", "update", {"id": 7, "name": f"c{i}"})],
    "two_courses": lambda i: [
        ("student", "update", {"id": i, "name": f"t{i}"}),
        ("student_course", "create", {"student_id": i, "course_id": 7}),
        ("student_course", "create", {"student_id": i, "course_id": 8}),
    ],
}


@st.composite
def school_log(draw: st.DrawFn) -> list[list[Event]]:
    """Committed transactions in commit order, each its change events then its END record;
    commit times a few ms to a few windows apart."""
    log, ts, lsn = [], T0, 1_000
    for tx in range(700, 700 + draw(st.integers(1, 6))):
        ts += draw(st.sampled_from([0, 1, WINDOW // 2, WINDOW, 3 * WINDOW]))
        events = []
        for table, op, data in SHAPES[draw(st.sampled_from(sorted(SHAPES)))](tx):
            lsn += 10
            events.append(row(table, op, data, tx, lsn, ts))
        counts: dict[str, int] = {}
        for event in events:
            counts[event.meta["table"]] = counts.get(event.meta["table"], 0) + 1
        log.append([*events, end(tx, counts, lsn + 1, ts)])
    return log


def _input(event: Event) -> str:
    return "tx" if event.type == "tx.end" else str(event.meta["table"])


def _split(data: st.DataObject, events: list[Event]) -> list[list[Event]]:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=6)))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in pairwise(bounds) if a < b]


def _deliver(data: st.DataObject, log: list[list[Event]], meta: bool) -> list[Event]:
    """Kafka's delivery: each input (a table's topic, the transaction topic) in commit order,
    the inputs interleaved at random, some events delivered again later on their input."""
    queues: dict[str, list[Event]] = {}
    for event in (e for tx in log for e in tx if meta or e.type != "tx.end"):
        queues.setdefault(_input(event), []).append(event)
    for events in queues.values():
        for event in data.draw(st.lists(st.sampled_from(list(events)), max_size=2)):
            events.insert(data.draw(st.integers(events.index(event) + 1, len(events))), event)
    arrival: list[Event] = []
    while any(queues.values()):
        name = data.draw(st.sampled_from(sorted(n for n, q in queues.items() if q)))
        arrival.append(queues[name].pop(0))
    return arrival


def _live_run(store: Store, batches: list[list[Event]], inputs: set[str]) -> None:
    """Each batch with the watermark the runner computes after it, then the inputs caught up
    and idle long enough that every window closes."""
    highs: dict[str, int] = {}
    for batch in batches:
        for event in batch:
            name, time = _input(event), int(event.meta["ts_ms"])
            highs[name] = max(highs.get(name, time), time)
        store.batch(batch, watermark(InputTime(highs.get(name)) for name in sorted(inputs)))
    late = T0 + 1_000 * WINDOW
    store.batch(
        [], watermark(input_time(highs.get(n), True, idle_after=0, now=late) for n in inputs)
    )


@given(school_log(), st.booleans(), st.data())
def test_any_delivery_and_batching_gives_the_business_events_of_one_batch(
    log: list[list[Event]], meta: bool, data: st.DataObject
) -> None:
    """Proves order- and batching-independence as Kafka delivers: inputs in commit order,
    interleaved at random, with re-deliveries, cut into any batches, the records carried
    between batches through the store, and each batch closing windows at the watermark the
    runner computes: the business events (ids, types, data) are those of one batch with every
    event, and no part is ever late."""
    arrival = _deliver(data, log, meta)
    inputs = {_input(e) for e in arrival}
    rules_ = TX_META if meta else NO_TX_META
    reference = correlate({}, arrival, FAR, rules_)
    store = Store(rules_)
    _live_run(store, _split(data, arrival), inputs)
    assert summary(store.business) == summary(reference.business)
    assert store.late == [] and reference.late == ()
    if meta:
        assert all(c.reason == "complete" for p in store.plans for c in p.closed)


@given(school_log(), st.booleans(), st.data())
def test_any_order_and_batching_before_the_watermark_gives_the_same_business_events(
    log: list[list[Event]], meta: bool, data: st.DataObject
) -> None:
    """Proves order-independence in general: every event, some twice, in any order at all
    and cut into any batches while the watermark is not yet known, then the watermark past
    every window: the same business events as one batch, with the same ids."""
    events = [e for tx in log for e in tx if meta or e.type != "tx.end"]
    events += data.draw(st.lists(st.sampled_from(events), max_size=3))
    shuffled = data.draw(st.permutations(events))
    rules_ = TX_META if meta else NO_TX_META
    store = Store(rules_)
    for batch in _split(data, list(shuffled)):
        store.batch(batch)
    store.batch([], FAR)
    assert summary(store.business) == summary(correlate({}, events, FAR, rules_).business)
    assert store.late == []


@given(
    st.lists(
        st.tuples(st.sampled_from(PARTS), st.integers(0, 2), st.integers(0, 4 * WINDOW)),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_windows_of_one_key_are_cut_the_same_for_any_order_and_batching(
    changes: list[tuple[Part, int, int]], data: st.DataObject
) -> None:
    """Proves the window cut of a field-path key (several windows over time for one key)
    depends only on the set of parts: changes of one key at random times, in any order and
    batching, expire into the same windows, hence the same business events and ids."""
    by_ref = rules(key="data.ref", complete_when=frozenset())
    events = [
        row(part.name, "update", {"id": n, "student_id": n, "course_id": n, "ref": r}, 1, n, T0 + t)
        for n, (part, r, t) in enumerate(changes)
    ]
    store = Store(by_ref)
    for batch in _split(data, list(data.draw(st.permutations(events)))):
        store.batch(batch)
    store.batch([], FAR)
    assert summary(store.business) == summary(correlate({}, events, FAR, by_ref).business)
    closed = {
        frozenset(e.id for p in c.parts.values() for e in p) for p in store.plans for c in p.closed
    }
    assert closed == _greedy_windows(events)


def _greedy_windows(events: list[Event]) -> set[frozenset[str]]:
    """The oracle: per key, the events by time, a window from the earliest, the next from the
    first event outside it, and so on."""
    windows: set[frozenset[str]] = set()
    for ref in {e.data["ref"] for e in events}:
        start, ids = None, set()
        for event in sorted(
            (e for e in events if e.data["ref"] == ref), key=lambda e: e.meta["ts_ms"]
        ):
            if start is not None and event.meta["ts_ms"] >= start + WINDOW:
                windows.add(frozenset(ids))
                start, ids = None, set()
            start = event.meta["ts_ms"] if start is None else start
            ids.add(event.id)
        windows.add(frozenset(ids))
    return windows


@given(school_log(), st.data())
def test_records_survive_the_store_unchanged(log: list[list[Event]], data: st.DataObject) -> None:
    """Proves a record read back from its JSON form is the record written, so a restart
    between any two batches changes nothing."""
    events = [e for tx in log for e in tx]
    cut = data.draw(st.integers(0, len(events)))
    plan = correlate({}, events[:cut], data.draw(st.sampled_from([None, T0 + WINDOW])), TX_META)
    for record in plan.write:
        again = Pending.from_json(json.loads(json.dumps(record.to_json())))
        assert again == record
        assert again.due(TX_META) == record.due(TX_META)


def test_a_generated_school_log_names_each_transaction_once() -> None:
    """Proves, on the school simulation's Debezium messages (commit order per table topic,
    shuffled across topics, in batches), that every transaction closes complete exactly
    once, with nothing missing or late, and that enrolments, moves and updates are named as
    the seed names them."""
    from projector.cdc_scenario import school_log as simulate  # noqa: PLC0415

    rng = random.Random(12)
    log = simulate(rng, students=20, courses=5, changes=120)
    per_tx: list[list[Event]] = []
    for tx in log:
        events = [_decoded(c) for c in tx.changes if c.payload is not None]
        counts: dict[str, int] = {}
        for event in events:
            counts[event.meta["table"]] = counts.get(event.meta["table"], 0) + 1
        per_tx.append([*events, end(tx.tx_id, counts, ts_ms=events[0].meta["ts_ms"])])
    arrival = [e for tx in per_tx for e in tx]
    rng.shuffle(arrival)
    store = Store(TX_META)
    for i in range(0, len(arrival), 17):
        store.batch(arrival[i : i + 17])
    closed = [c for p in store.plans for c in p.closed]
    assert sorted(c.key for c in closed) == sorted(str(tx.tx_id) for tx in log)
    assert all(c.reason == "complete" and not c.missing for c in closed) and not store.late
    assert sorted(e.type for e in store.business) == sorted(_seed_names(log))


def _decoded(change: Any) -> Event:
    key, value = change.wire(envelope=False)
    event = DECODER.decode(RawMessage(f"school.public.{change.table}", 0, 0, key, value))
    assert event is not None
    return event


def _seed_names(log: Sequence[Any]) -> list[str]:
    """The business events the seed expects, told from each transaction's ops alone."""
    names: list[str] = []
    for tx in log:
        ops = [(c.table, c.payload["op"]) for c in tx.changes if c.payload is not None]
        links = [op for table, op in ops if table == "student_course"]
        if "d" in links and "c" in links:
            names.append("change")
        elif links:
            names += ["enroll" if op == "c" else "unenroll" for op in links]
        else:
            names += ["update" for _, op in ops if op in "cu"]
    return names
