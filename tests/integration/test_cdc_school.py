"""The seed's CDC case end to end: students, courses and enrolments from three Debezium topics
(public.student, public.course, public.student_course) into ``handlers.school``'s tables and
views, against real Kafka and PostgreSQL, checked against the independent oracle of
``projector.cdc_scenario`` whatever the arrival order, duplication or restarts."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from projector.cdc_scenario import (
    TABLES,
    Change,
    SchoolState,
    Transaction,
    by_table,
    oracle,
    publish_changes,
    redelivered,
    school_log,
)
from projector.config import Config
from projector.metrics import Metrics
from projector.runner.daemon import Daemon
from tests.conftest import Services
from tests.integration.harness import make_config, migrate_all, rows

pytestmark = pytest.mark.integration

OUTCOMES = ("consumed", "applied", "duplicate", "ignored")


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> dict[str, str]:
    """One topic per source table, as the connector names them (here: fresh names)."""
    return {table: new_topic(partitions=2) for table in TABLES}


def school_config(services: Services, pg_dsn: str, topics: dict[str, str]) -> Config:
    projection = {
        "name": "school",
        "mode": "merge",
        "topics": [topics[t] for t in TABLES],
        "decoder": {"kind": "debezium"},
        "handlers": ["handlers.school"],
        # Small batches, so that a row's create and its delete mostly land in different ones.
        "batch_max_messages": 16,
    }
    config = make_config(services, pg_dsn, [projection])
    migrate_all(config)
    return config


def run_counted(config: Config) -> dict[str, float]:
    """Run the daemon until caught up; its event counts by outcome."""
    metrics = Metrics()
    assert Daemon(config, exit_when_caught_up=True, metrics=metrics).run() == 0
    # The counter itself, not the registry: a registry read would also run the daemon's store
    # collector, which opens a connection to the store the daemon has closed.
    [family] = metrics.events.collect()
    totals = {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}
    return {o: totals.get(o, 0) for o in OUTCOMES}


def publish(
    services: Services, topics: dict[str, str], per_table: dict[str, list[Change]], envelope: bool
) -> int:
    return sum(
        publish_changes(services.kafka, topics[t], changes, envelope)
        for t, changes in per_table.items()
    )


def tombstones(changes: Sequence[Change]) -> int:
    return sum(1 for c in changes if c.payload is None)


def assert_matches(pg_dsn: str, state: SchoolState) -> None:
    """The three tables hold the oracle's rows and both views show what it computes."""
    expected = state.table_rows()
    assert (
        rows(pg_dsn, "select id, name, email, age from school.students order by id")
        == (expected["students"])
    )
    assert (
        rows(pg_dsn, "select id, name, teacher, room from school.courses order by id")
        == (expected["courses"])
    )
    assert rows(pg_dsn, "select * from school.enrolments order by 1, 2") == expected["enrolments"]
    assert enrolment_view(pg_dsn) == state.enrolment_view()
    assert rows(pg_dsn, "select * from school.student_courses order by student_id") == (
        state.student_courses()
    )


def enrolment_view(pg_dsn: str) -> list[tuple[Any, ...]]:
    return rows(
        pg_dsn,
        "select student_id, student_name, course_id, course_name, teacher"
        " from school.enrolment_view order by student_id, course_id",
    )


def dead_letters(pg_dsn: str) -> int:
    [(count,)] = rows(pg_dsn, "select count(*) from projector.dead_letters")
    return int(count)


def test_the_log_in_commit_order(services: Services, pg_dsn: str, topics: dict[str, str]) -> None:
    """Proves the straight case, with the JSON converter's schema envelope on: each topic
    holds its table's changes in commit order (the daemon still interleaves the three topics
    as it likes); the tables and both views equal the oracle's. Every tombstone is ignored
    and counted, none is a dead letter, and every change event is applied."""
    log = school_log(random.Random(1), students=50, courses=10, changes=220)
    per_table = by_table(log)
    published = publish(services, topics, per_table, envelope=True)
    config = school_config(services, pg_dsn, topics)
    counts = run_counted(config)
    assert_matches(pg_dsn, oracle(log))
    all_changes = [c for changes in per_table.values() for c in changes]
    assert counts["consumed"] == published
    assert counts["ignored"] == tombstones(all_changes) > 0
    assert counts["applied"] == published - tombstones(all_changes)
    assert dead_letters(pg_dsn) == 0


def test_shuffled_duplicated_and_stale_redeliveries(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves order independence across and within topics (schema envelope off): every topic
    shuffled, a fifth of its messages delivered twice and as many older ones re-delivered
    after everything else, so per row the highest LSN must win over stale copies. Across
    topics the extreme case: all enrolments are applied first, with no student or course
    known — the enrolments table already holds the oracle's rows but the inner-join view
    shows none — then students and courses arrive and the view equals the oracle."""
    rng = random.Random(2)
    log = school_log(rng, students=50, courses=10, changes=220)
    per_table = {t: redelivered(rng, changes, 0.2) for t, changes in by_table(log).items()}
    state = oracle(log)
    config = school_config(services, pg_dsn, topics)

    first = {"student_course": per_table["student_course"]}
    counts = run_counted_after(services, topics, first, config)
    assert rows(pg_dsn, "select * from school.enrolments order by 1, 2") == sorted(state.enrolments)
    assert enrolment_view(pg_dsn) == []
    assert counts["ignored"] == tombstones(first["student_course"])

    rest = {t: per_table[t] for t in ("student", "course")}
    counts = run_counted_after(services, topics, rest, config)
    assert_matches(pg_dsn, state)
    assert counts["ignored"] == tombstones(rest["student"]) + tombstones(rest["course"])
    assert dead_letters(pg_dsn) == 0


def run_counted_after(
    services: Services,
    topics: dict[str, str],
    per_table: dict[str, list[Change]],
    config: Config,
    envelope: bool = False,
) -> dict[str, float]:
    published = publish(services, topics, per_table, envelope)
    counts = run_counted(config)
    assert counts["consumed"] == published
    return counts


def student_deletion(log: Sequence[Transaction]) -> int:
    """The index of a transaction past the first third that deletes a student who has
    enrolments (its student_course deletes come in the same transaction)."""
    for i, tx in enumerate(log):
        tables = {(c.table, c.payload["op"]) for c in tx.changes if c.payload is not None}
        if i > len(log) // 3 and {("student", "d"), ("student_course", "d")} <= tables:
            return i
    raise AssertionError("the log deletes no enrolled student")


def test_restart_between_halves_and_a_student_deletion(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves the merge state survives restarts (three daemon runs) and what a student's
    deletion does to the view. Run 1: the log up to a transaction that deletes an enrolled
    student; the view shows that student's enrolments. Run 2: only the student topic's rest,
    with the deleted student's creation re-delivered after its deletion: the student stays
    deleted (the tombstone is in the store) and the view already hides its enrolments, though
    their own deletes are not consumed yet (they are still in the enrolments table). Run 3:
    the other topics' rest, with first-half messages re-delivered: everything equals the
    oracle of the whole log and the student has no enrolments left anywhere."""
    rng = random.Random(3)
    log = school_log(rng, students=50, courses=10, changes=220)
    split = student_deletion(log)
    [sid] = [c.key["id"] for c in log[split].changes if c.table == "student" and c.payload]
    first, second = by_table(log[:split]), by_table(log[split:])
    config = school_config(services, pg_dsn, topics)

    run_counted_after(services, topics, first, config, envelope=True)
    assert_matches(pg_dsn, oracle(log[:split]))
    assert any(row[0] == sid for row in enrolment_view(pg_dsn))

    created = [c for c in first["student"] if c.key["id"] == sid]
    students = {"student": [*rng.sample(second["student"], len(second["student"])), *created]}
    run_counted_after(services, topics, students, config, envelope=True)
    assert not any(row[0] == sid for row in enrolment_view(pg_dsn))
    assert rows(pg_dsn, "select 1 from school.students where id = %s", (sid,)) == []
    assert rows(pg_dsn, "select 1 from school.enrolments where student_id = %s", (sid,)) != []

    rest = {
        t: redelivered(rng, second[t], 0.2) + rng.sample(first[t], len(first[t]) // 4)
        for t in ("course", "student_course")
    }
    counts = run_counted_after(services, topics, rest, config, envelope=True)
    assert_matches(pg_dsn, oracle(log))
    assert rows(pg_dsn, "select 1 from school.enrolments where student_id = %s", (sid,)) == []
    assert counts["ignored"] == sum(tombstones(changes) for changes in rest.values())
    assert dead_letters(pg_dsn) == 0
