"""Correlation (issue 12, docs/correlation.md slice 2) against real Kafka and PostgreSQL: the
STUDENT, COURSE and STUDENT_COURSE rows of one Debezium transaction, with the transaction
topic's END record, become one business event, whatever the arrival order, across crashes
and instances; windows close by the transaction's END counts, by expiry, or by an idle
watermark driven by the daemon's injected clock.

The tests are a contract: they reach the store through the ``backend`` fixture (a
:class:`Backend`, PostgreSQL here), and ``tests/integration/test_correlation_redis.py`` runs the
same ones on Redis with a backend of its own."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from handlers.school_correlation import name_business_events
from projector.cdc_scenario import (
    Change,
    Transaction,
    business_oracle,
    commit_ms,
    redelivered,
    school_log,
    transaction_records,
)
from projector.config import Config, parse_config
from projector.core.correlate import business_id
from projector.metrics import Metrics
from projector.runner.daemon import Daemon
from projector.runner.dead_letters import resolve
from projector.store.base import Store
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration import business_log as module
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import config_dict, daemon_process, migrate_all, rows, write_config

pytestmark = pytest.mark.integration

TABLES = ("student", "course", "student_course")
RULE = "handlers.school_correlation:name_business_events"
PARTS = {t: f"public.{t}" for t in TABLES}
Message = tuple[str, bytes, bytes | None]  # topic, key, value


class Clock:
    """The daemon's clock (epoch seconds), set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


tx_ms = commit_ms  # the transaction's commit time (source.ts_ms), as the tests call it


def change_message(topics: dict[str, str], change: Change) -> Message:
    key, value = change.wire(envelope=False)
    return topics[change.table], key, value


def end_message(topics: dict[str, str], tx: Transaction) -> Message:
    """The transaction topic's END record of ``tx`` (its change counts per table)."""
    key, value = transaction_records(tx)[-1]
    return topics["transaction"], key, value


def send(services: Services, messages: Iterable[Message]) -> None:
    producer = Producer(
        {"bootstrap.servers": services.kafka, "enable.idempotence": True, "linger.ms": 5}
    )
    for topic, key, value in messages:
        producer.produce(topic, value=value, key=key)
        producer.poll(0)
    assert producer.flush(60) == 0


def enrolments(log: Sequence[Transaction], count: int) -> list[Transaction]:
    """The first ``count`` transactions that create a student, a course and the enrolment."""
    wanted = {(t, "c") for t in TABLES}
    found = [
        tx
        for tx in log
        if len(tx.changes) == 3
        and {(c.table, c.payload["op"]) for c in tx.changes if c.payload} == wanted
    ]
    assert len(found) >= count, "the log has too few new-student-new-course enrolments"
    return found[:count]


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> dict[str, str]:
    """A topic per table and the transaction topic (fresh names)."""
    return {name: new_topic(partitions=2) for name in (*TABLES, "transaction")}


def projection(
    topic_of: dict[str, str], handlers: Sequence[str], **correlation: Any
) -> dict[str, Any]:
    """The school projection over the four topics, its correlation section updated."""
    return {
        "name": "school",
        "mode": "merge",
        "topics": [topic_of[t] for t in (*TABLES, "transaction")],
        "decoder": {"kind": "debezium"},
        "handlers": ["handlers.school", *handlers],
        "batch_max_messages": 50,
        "correlation": {
            "rule": RULE,
            "window": "10s",
            "parts": PARTS,
            "transaction_metadata": True,
            **correlation,
        },
    }


def make(services: Services, pg_dsn: str, proj: dict[str, Any]) -> Config:
    config = parse_config(config_dict(services, pg_dsn, [proj]), env={})
    migrate_all(config)
    return config


def run_burst(config: Config, clock: Clock) -> Metrics:
    """The daemon in-process until caught up, with ``clock`` as its clock."""
    metrics = Metrics()
    assert Daemon(config, exit_when_caught_up=True, clock=clock, metrics=metrics).run() == 0
    return metrics


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    """A counter's value (read from the metric, not the registry, whose store collector would
    open a connection)."""
    metric = getattr(metrics, name)
    total = 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def business_log(pg_dsn: str) -> list[tuple[Any, ...]]:
    return rows(pg_dsn, "select id, type, stream, data from school.business_log order by n")


def expected_enroll(tx: Transaction) -> tuple[str, str]:
    """(id, type) of the transaction's business event: the rule on its parts, the id from its
    key and the ids the Debezium decoder gives its changes."""
    ids = [f"{c.table}:{','.join(str(v) for v in c.key.values())}@{c.lsn}/c" for c in tx.changes]
    return business_id("school", str(tx.tx_id), ids), "enroll"


def after(tx: Transaction, table: str) -> dict[str, Any]:
    """The row a transaction's (first) change of ``table`` wrote."""
    payload = next(c.payload for c in tx.changes if c.table == table and c.payload)
    row: dict[str, Any] = payload["after"]
    return row


def open_parts(pg_dsn: str) -> int:
    [(count,)] = rows(
        pg_dsn,
        "select count(*) from projector.correlations where record->'parts' <> '{}'::jsonb",
    )
    return int(count)


LogRow = tuple[str, str, str, dict[str, Any]]  # business id, type, stream, data


class Backend:
    """The store a correlation test runs against, and how the test reads it back: its
    projection (handlers in the store's flavour), its config, and projector's own state and
    the test handlers' views in store-neutral shapes. This one is PostgreSQL."""

    kind = "postgres"

    def __init__(self, services: Services, pg_dsn: str) -> None:
        self.services = services
        self.pg_dsn = pg_dsn

    def projection(
        self, topic_of: dict[str, str], handlers: Sequence[str], **correlation: Any
    ) -> dict[str, Any]:
        """The school projection (:func:`projection`); ``handlers`` named as for PostgreSQL."""
        return projection(topic_of, handlers, **correlation)

    def config_dict(self, proj: dict[str, Any]) -> dict[str, Any]:
        return config_dict(self.services, self.pg_dsn, [proj])

    def make(self, proj: dict[str, Any]) -> Config:
        config = parse_config(self.config_dict(proj), env={})
        migrate_all(config)
        return config

    def process_config(self, tmp_path: Path, proj: dict[str, Any]) -> Path:
        """A config file for ``projector run`` as a real process, PostgreSQL migrated."""
        data = self.config_dict(proj)
        path = write_config(tmp_path / "config.yaml", data)
        migrate_all(parse_config(data, env={}))
        return path

    def store(self) -> Store:
        """A store connection of the test's own (the caller closes it)."""
        return PostgresStore(self.pg_dsn)

    def business_log(self) -> list[LogRow]:
        """Every business event ``tests.integration.business_log`` applied, once per time."""
        return [(i, t, s, d) for i, t, s, d in business_log(self.pg_dsn)]

    def history(self) -> list[tuple[str, str]]:
        """``handlers.school_history``'s rows: (business id, type), sorted."""
        return [
            (i, t)
            for i, t in rows(
                self.pg_dsn, "select business_id, type from school.enrolment_history order by 1"
            )
        ]

    def open_parts(self) -> int:
        """Correlation records with open parts."""
        return open_parts(self.pg_dsn)

    def consumed(self) -> int:
        """The sum of the checkpoints (messages read, every partition starting at 0)."""
        return consumed(self.pg_dsn)

    def owners(self, writing: bool = False) -> int:
        """How many instances own partitions (``writing``: partitions they moved past 0)."""
        where = " where next_offset > 0" if writing else ""
        [(count,)] = rows(
            self.pg_dsn, f"select count(distinct owner) from projector.checkpoints{where}"
        )
        return int(count)

    def dead_letters(self) -> list[tuple[int, str, str | None, str]]:
        """(id, kind, event type, status) of every dead letter, by id."""
        return [
            (int(i), k, t, s)
            for i, k, t, s in rows(
                self.pg_dsn,
                "select id, kind, event->>'type', status from projector.dead_letters order by id",
            )
        ]


@pytest.fixture
def backend(services: Services, pg_dsn: str) -> Backend:
    return Backend(services, pg_dsn)


def test_three_parts_in_all_six_orders_make_one_enroll_each(
    backend: Backend, topics: dict[str, str]
) -> None:
    """Proves order independence across the three table topics: six transactions, each
    enrolling a new student in a new course, whose parts are published in the six orders of
    the three tables (one part of each per daemon run, three runs, so the order is the
    arrival order), with each END record arriving in a different run (``lateness`` covers
    that the later runs' parts are older than what their partitions already gave). No business event
    exists before a transaction's last part; after the third run each transaction has exactly
    one ``enroll`` with the id derived from its key and parts, its student and course in the
    data; the history view holds the same. A fourth run re-delivering everything adds
    nothing (duplicates, counted)."""
    log = school_log(random.Random(12), students=60, courses=10, changes=300)
    txs = enrolments(log, 6)
    clock = Clock(tx_ms(txs[0]) / 1000)  # the idle floor (now - 30 s) stays below every part
    # Publishing a transaction's parts in later runs puts them behind later transactions'
    # parts on one partition, out of commit order: lateness allows for it, so windows close
    # by their END record's counts only.
    handlers = ["handlers.school_history", "tests.integration.business_log"]
    config = backend.make(backend.projection(topics, handlers, lateness="1h"))
    orders = list(itertools.permutations(TABLES))
    for stage in range(3):
        messages = [
            change_message(topics, next(c for c in tx.changes if c.table == order[stage]))
            for tx, order in zip(txs, orders, strict=True)
        ]
        messages += [end_message(topics, tx) for i, tx in enumerate(txs) if i % 3 == stage]
        send(backend.services, messages)
        metrics = run_burst(config, clock)
        if stage < 2:
            assert backend.business_log() == []
            assert backend.open_parts() == 6
    logged = backend.business_log()
    assert sorted((i, t) for i, t, _, _ in logged) == sorted(expected_enroll(tx) for tx in txs)
    for tx in txs:
        [(data,)] = [(d,) for i, _, _, d in logged if i == expected_enroll(tx)[0]]
        student = after(tx, "student")
        course = after(tx, "course")
        assert (data["student"], data["course"], data["lookup"]) == (student, course, {})
    assert counter(metrics, "correlations_closed", reason="complete") == 6
    assert backend.open_parts() == 0
    assert backend.history() == sorted(expected_enroll(tx) for tx in txs)

    send(backend.services, [change_message(topics, c) for tx in txs for c in tx.changes])
    send(backend.services, [end_message(topics, tx) for tx in txs])
    metrics = run_burst(config, clock)
    assert len(backend.business_log()) == 6
    assert counter(metrics, "correlation_duplicates") == 24
    assert backend.dead_letters() == []


def retimed(tx: Transaction, ts_ms: int, only: str | None = None) -> Transaction:
    """``tx`` with its commit time (``source.ts_ms``) set to ``ts_ms``; with ``only``, on that
    table's changes alone (a field-keyed correlation's parts need not share a transaction)."""
    changes = []
    for c in tx.changes:
        payload = c.payload
        if payload is not None and (only is None or c.table == only):
            payload = {**payload, "source": {**payload["source"], "ts_ms": ts_ms}}
        changes.append(Change(c.table, c.key, payload, c.lsn))
    return Transaction(tx.tx_id, tuple(changes))


def test_parts_outside_the_window_make_partial_events(
    backend: Backend, topics: dict[str, str]
) -> None:
    """Proves windows in event time with a field-path key and no transaction metadata
    (``key: data.student_id``, the STUDENT part keyed by ``data.id``; complete when both
    parts are in): a student and its enrolment 2 s apart make one ``enroll``; another
    student's enrolment 20 s after its creation (window 10 s) is two windows: nothing is named
    while the idle watermark (the injected clock) is behind them, then each expires alone and
    names its partial event: an ``update`` of the student, and an ``enroll`` whose student is
    left for the handler to look up."""
    a, b = enrolments(school_log(random.Random(7), changes=300), 2)
    t = tx_ms(b)
    a = retimed(retimed(a, t - 2_000), t, only="student_course")
    b = retimed(b, t + 20_000, only="student_course")
    proj = backend.projection(
        topics,
        ["tests.integration.business_log"],
        topics=[topics["student"], topics["student_course"]],
        transaction_metadata=None,
        key="data.student_id",
        parts={
            "student": {"source": "public.student", "key": "data.id"},
            "student_course": "public.student_course",
        },
    )
    config = backend.make(proj)
    send(backend.services, [change_message(topics, c) for tx in (a, b) for c in tx.changes])
    clock = Clock(t / 1000)
    metrics = run_burst(config, clock)
    [(first, kind, stream, data)] = backend.business_log()
    a_student = next(c.key["id"] for c in a.changes if c.table == "student")
    assert (kind, stream, data["student"]["id"]) == ("enroll", f"student:{a_student}", a_student)
    assert counter(metrics, "correlations_closed", reason="complete") == 1

    clock.now = (t + 20_000 + 10_000 + 30_000) / 1000  # + window + idle_after: all expire
    metrics = run_burst(config, clock)
    b_student = next(c.key["id"] for c in b.changes if c.table == "student")
    partial = sorted(
        (k, d.get("student_id"), d["student"] is None)
        for i, k, _, d in backend.business_log()
        if i != first
    )
    assert partial == [("enroll", b_student, True), ("update", None, False)]
    assert counter(metrics, "correlations_closed", reason="expired") == 2
    assert backend.open_parts() == 0


def test_a_lone_part_closes_by_the_idle_watermark(backend: Backend, topics: dict[str, str]) -> None:
    """Proves idleness, with the injected clock and no real waiting: a transaction whose END
    record counts three changes, of which only the STUDENT one arrives. With every partition
    caught up, the watermark follows the clock at ``now - idle_after``; the window (10 s) stays
    open at 39 s after the commit (idle_after 30 s) and closes, expired, at 40 s: one
    ``update`` with the student, two parts counted missing. The close happens on an idle tick
    (no message to read), in the daemon's burst run."""
    [tx] = enrolments(school_log(random.Random(5), changes=200), 1)
    t = tx_ms(tx)
    config = backend.make(backend.projection(topics, ["tests.integration.business_log"]))
    student = next(c for c in tx.changes if c.table == "student")
    send(backend.services, [change_message(topics, student), end_message(topics, tx)])
    clock = Clock(t / 1000)
    for seconds in (0, 39):
        clock.now = (t + seconds * 1000) / 1000
        run_burst(config, clock)
        assert backend.business_log() == []
        assert backend.open_parts() == 1
    # The gauges, as a scrape reads them from the store: one open correlation, and the
    # watermark (every input caught up: the idle floor, 39 - 30 s after the commit) 30 s
    # behind the clock.
    assert store_gauges(backend.store(), topics, clock) == {
        "projector_correlations_open": 1.0,
        "projector_correlation_watermark_lag_seconds": 30.0,
    }
    clock.now = (t + 40_000) / 1000
    metrics = run_burst(config, clock)
    [(_, kind, _, data)] = backend.business_log()
    assert (kind, data["student"]) == ("update", after(tx, "student"))
    assert counter(metrics, "correlations_closed", reason="expired") == 1
    assert counter(metrics, "correlation_missing") == 2
    assert counter(metrics, "business_events") == 1
    assert backend.open_parts() == 0


def gauges(pg_dsn: str, topics: dict[str, str], clock: Clock) -> dict[str, float]:
    """The correlation gauges of a fresh registry whose source is the test's database."""
    return store_gauges(PostgresStore(pg_dsn), topics, clock)


def store_gauges(store: Store, topics: dict[str, str], clock: Clock) -> dict[str, float]:
    """The correlation gauges of a fresh registry whose source is ``store`` (closed here)."""
    metrics = Metrics()
    metrics.correlation_figures.clock = clock
    names = list(topics.values())
    metrics.correlation_figures.add(
        "school", lambda: store.correlation_figures("school", names), store.close
    )
    try:
        return {
            family.name: family.samples[0].value
            for family in metrics.correlation_figures.collect()
            if family.samples
        }
    finally:
        store.close()


def process_config(services: Services, pg_dsn: str, tmp_path: Path, proj: dict[str, Any]) -> Path:
    data = config_dict(services, pg_dsn, [proj])
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    return path


def consumed(pg_dsn: str) -> int:
    [(count,)] = rows(pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints")
    return int(count)


def test_kill_9_while_a_window_is_open_then_restart_closes_it_once(
    backend: Backend, topics: dict[str, str], tmp_path: Path
) -> None:
    """Proves an open correlation survives crashes and closes once. A real daemon process
    reads two of a transaction's three parts and its END record, stores the open window, and
    is killed with SIGKILL. The third part is published; the restarted daemon is made to die
    just before committing the very batch that closes the window (crash point
    ``before-commit``). A third start closes it: one ``enroll``, then re-deliveries of every
    message add nothing."""
    now = int(time.time() * 1000)
    [tx] = enrolments(school_log(random.Random(9), changes=200), 1)
    tx = retimed(tx, now)
    proj = backend.projection(
        topics, ["tests.integration.business_log"], window="60s", idle_after="1h"
    )
    path = backend.process_config(tmp_path, proj)
    first = [c for c in tx.changes if c.table != "student_course"]
    send(backend.services, [*(change_message(topics, c) for c in first), end_message(topics, tx)])
    proc = daemon_process(path)
    try:
        wait_until(lambda: backend.consumed() == 3, "the first parts to be read")
        wait_until(lambda: backend.open_parts() == 1, "the open window to be stored")
    finally:
        proc.kill()
        proc.wait(30)
    last = next(c for c in tx.changes if c.table == "student_course")
    send(backend.services, [change_message(topics, last)])
    crashing = daemon_process(
        path, env={"PROJECTOR_CRASH_AT": "before-commit", "PROJECTOR_CRASH_AFTER": "1"}
    )
    assert crashing.wait(60) == -9
    assert backend.business_log() == [] and backend.open_parts() == 1
    proc = daemon_process(path)
    try:
        wait_until(lambda: len(backend.business_log()) == 1, "the window to close")
        send(backend.services, [change_message(topics, c) for c in tx.changes])
        wait_until(lambda: backend.consumed() == 7, "the re-deliveries to be read")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    [(business, kind, _, _)] = backend.business_log()
    assert (business, kind) == expected_enroll(tx)
    assert backend.open_parts() == 0


def test_two_instances_close_every_transaction_once(
    backend: Backend, topics: dict[str, str], tmp_path: Path
) -> None:
    """Proves correlation across instances: two daemon processes in one group share the
    partitions (one of each topic's two), so one transaction's parts are read by both; they
    serialise on its correlation row. Every transaction of a school log (enrolments, moves,
    updates, deletions; with END records; commit times near now, so nothing expires by
    idleness) is closed once: the business events appended equal those the rule names on
    each transaction's changes, each exactly once, and no correlation is left open."""
    now = int(time.time() * 1000)
    log = [retimed(tx, now + i) for i, tx in enumerate(school_log(random.Random(4), changes=150))]
    proj = backend.projection(
        topics, ["tests.integration.business_log"], window="60s", idle_after="1h"
    )
    path = backend.process_config(tmp_path, proj)
    procs = [daemon_process(path, log=tmp_path / f"instance{i}.log") for i in range(2)]
    try:
        wait_until(lambda: backend.owners() == 2, "both instances to own partitions")
        messages = [change_message(topics, c) for tx in log for c in tx.changes]
        send(backend.services, [*messages, *(end_message(topics, tx) for tx in log)])
        expected = sorted(expected_business(log))
        wait_until(lambda: len(backend.business_log()) >= len(expected), "every business event")
        wait_until(lambda: backend.open_parts() == 0, "every window to close")
        assert backend.owners(writing=True) == 2  # both instances applied batches
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(30) == 0
    assert sorted((i, k) for i, k, _, _ in backend.business_log()) == expected
    assert backend.dead_letters() == []


def expected_business(log: Sequence[Transaction]) -> list[tuple[str, str]]:
    """(id, type) of every business event the rule names on each transaction's changes."""
    return business_oracle(log, "school", name_business_events)


def test_rule_and_business_handler_failures_are_dead_letters_and_retry(
    backend: Backend, topics: dict[str, str]
) -> None:
    """Proves the dead-letter behaviour of the correlation step: of three enrolment
    transactions, the rule raises on the first (a ``correlation_rule`` dead letter holding its
    parts) and ``handle_business`` on the second's business event (a ``handler`` dead letter
    holding it); the third goes on, and the windows stay closed. After the fix,
    ``dead-letters retry`` names the first again and applies both, with the ids a first
    success would have had."""
    txs = enrolments(school_log(random.Random(3), changes=300), 3)
    proj = backend.projection(topics, ["tests.integration.business_log"])
    proj["correlation"]["rule"] = "tests.integration.business_log:rule"
    config = backend.make(proj)
    sid = [next(c.key["id"] for c in tx.changes if c.table == "student") for tx in txs]
    send(backend.services, [change_message(topics, c) for tx in txs for c in tx.changes])
    send(backend.services, [end_message(topics, tx) for tx in txs])
    module.FAIL_RULE_FOR.add(sid[0])
    module.FAIL_HANDLER_FOR.add(sid[1])
    try:
        metrics = run_burst(config, Clock(tx_ms(txs[0]) / 1000))
    finally:
        module.FAIL_RULE_FOR.clear()
        module.FAIL_HANDLER_FOR.clear()
    assert [i for i, *_ in backend.business_log()] == [expected_enroll(txs[2])[0]]
    letters = backend.dead_letters()
    assert sorted((k, t) for _, k, t, _ in letters) == [
        ("correlation_rule", "correlation.parts"),
        ("handler", "enroll"),
    ]
    assert counter(metrics, "correlations_closed", reason="complete") == 3
    assert backend.open_parts() == 0

    outcomes = resolve(config, "school", [i for i, *_ in letters], "retry", time.time)
    assert [o.status for o in outcomes] == ["retried", "retried"]
    assert sorted(i for i, *_ in backend.business_log()) == sorted(
        expected_enroll(tx)[0] for tx in txs
    )
    assert [s for *_, s in backend.dead_letters()] == ["retried", "retried"]


def test_a_shuffled_and_redelivered_school_log_names_the_rules_events_once(
    backend: Backend, topics: dict[str, str]
) -> None:
    """Proves the whole pipeline on a school log (enrolments, moves, updates, deletions) whose
    topics are each shuffled, with a fifth of the messages delivered twice and older ones
    re-delivered after everything (``cdc_scenario.redelivered``), END records shuffled too:
    the business events are those the rule names on each transaction's changes, each exactly
    once, nothing is left open and nothing is a dead letter. Shuffling breaks each partition's
    commit order, so ``lateness`` covers it and windows close by their END counts."""
    rng = random.Random(21)
    log = school_log(rng, changes=150)
    per_table: dict[str, list[Change]] = {t: [] for t in TABLES}
    for tx in log:
        for c in tx.changes:
            per_table[c.table].append(c)
    messages = [
        change_message(topics, c) for t in TABLES for c in redelivered(rng, per_table[t], 0.2)
    ]
    ends = [end_message(topics, tx) for tx in log]
    send(backend.services, [*messages, *rng.sample(ends, len(ends)), *ends[: len(ends) // 5]])
    proj = backend.projection(topics, ["tests.integration.business_log"], lateness="1h")
    run_burst(backend.make(proj), Clock(tx_ms(log[0]) / 1000))
    assert sorted((i, k) for i, k, _, _ in backend.business_log()) == sorted(expected_business(log))
    assert backend.open_parts() == 0
    assert backend.dead_letters() == []
