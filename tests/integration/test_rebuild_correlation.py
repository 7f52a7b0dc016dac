"""``projector rebuild`` of a correlated projection (issue 12, docs/correlation.md slice 5),
against real Kafka and PostgreSQL: the school projection (students, courses, enrolments from
Debezium, with the transaction topic) names business events; its ``enrolment_history`` view
is rebuilt and swapped in with the correlations, and the outbox gains only what the live run
still owed."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from projector.cdc_scenario import Transaction, school_log
from projector.cli import app
from projector.config import Config
from projector.runner import rebuild as rb
from projector.runner.daemon import Daemon
from projector.runner.rebuild import rebuild
from projector.store.migrate import migrate
from projector.store.postgres import PostgresStore
from projector.store.postgres_rebuild import PgRebuildStore
from tests.conftest import Services, unique
from tests.integration.gaps_harness import running_daemon, wait_until
from tests.integration.harness import rows
from tests.integration.test_correlation import (
    TABLES,
    Clock,
    Message,
    business_log,
    change_message,
    end_message,
    expected_business,
    make,
    open_parts,
    process_config,
    projection,
    run_burst,
    send,
    tx_ms,
)

pytestmark = pytest.mark.integration

HANDLERS = ["handlers.school_history", "tests.integration.business_log"]


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> dict[str, str]:
    """A topic per table, the transaction topic, and the outbox's topic (fresh names)."""
    made = {name: new_topic(partitions=2) for name in (*TABLES, "transaction")}
    return {**made, "outbox": new_topic()}


def school(topics: dict[str, str], batch: int = 50, **correlation: Any) -> dict[str, Any]:
    """The school projection with the history view, the test's business log and an outbox;
    ``batch`` messages at most per batch; ``correlation`` updates its correlation section."""
    proj = projection(topics, HANDLERS, outbox={"topic": topics["outbox"]}, **correlation)
    return {**proj, "batch_max_messages": batch}


def messages_of(
    topics: dict[str, str], log: Sequence[Transaction], without_end: Sequence[int] = ()
) -> list[Message]:
    """The log's changes in commit order, each transaction's END record after its changes
    (none for the transactions at ``without_end``: their windows can only expire)."""
    out: list[Message] = []
    for i, tx in enumerate(log):
        out += [change_message(topics, c) for c in tx.changes]
        if i not in without_end:
            out.append(end_message(topics, tx))
    return out


def history(pg_dsn: str) -> list[tuple[Any, ...]]:
    return rows(pg_dsn, "select * from school.enrolment_history order by business_id")


def outbox(pg_dsn: str, projection: str = "school") -> list[tuple[Any, ...]]:
    """(seq, event_id, status) of a projection's outbox rows, in queue order."""
    return rows(
        pg_dsn,
        "select seq, event_id, status from projector.outbox where projection = %s order by seq",
        (projection,),
    )


def logged(pg_dsn: str) -> list[tuple[Any, ...]]:
    """The business log as a sorted list: each business event the handlers were given."""
    return sorted(business_log(pg_dsn))


def rebuild_leftovers(pg_dsn: str) -> dict[str, int]:
    """Rows the rebuild's own state (``school#rebuild``) still has, per table, and shadow or
    old schemas left: all zero once a rebuild swapped."""
    counts = {
        table: rows(
            pg_dsn,
            f"select count(*) from projector.{table} where projection = 'school#rebuild'",
        )[0][0]
        for table in ("correlations", "checkpoints", "outbox", "documents", "dead_letters")
    }
    counts["rebuilds"] = rows(pg_dsn, "select count(*) from projector.rebuilds")[0][0]
    counts["schemas"] = rows(
        pg_dsn,
        "select count(*) from pg_namespace where nspname in ('school__rebuild', 'school__old')",
    )[0][0]
    return counts


CLEAN = dict.fromkeys(
    ("correlations", "checkpoints", "outbox", "documents", "dead_letters", "rebuilds", "schemas"),
    0,
)


def ids_of(business: Sequence[tuple[str, str]]) -> list[str]:
    return sorted(i for i, _ in business)


def test_a_rebuild_names_the_live_runs_business_events_and_queues_nothing(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves "a rebuild yields the same business events" on the school scenario: a live run
    names the business events of a school log (one transaction in five without its END record,
    so its window expires instead of completing; the injected clock lets the idle watermark
    pass every window at the end); ``rebuild`` then builds the projection again from the
    topics and swaps it in. The rebuilt ``enrolment_history`` equals the live one row for row
    (same business ids, types, students, courses, times, data), the handlers were given each
    business event once (the rebuilt business log equals the live one), every id is the one
    the rule gives each transaction, no correlation is left open, the outbox gained no row
    (the live rows are untouched, none held is left) and nothing of the rebuild's own state
    remains."""
    log = school_log(random.Random(31), changes=150)
    send(services, messages_of(topics, log, without_end=range(0, len(log), 5)))
    clock = Clock(tx_ms(log[-1]) / 1000 + 60)  # window 10 s + idle_after 30 s: all close
    config = make(services, pg_dsn, school(topics))
    run_burst(config, clock)
    live_history, live_log, live_outbox = history(pg_dsn), logged(pg_dsn), outbox(pg_dsn)
    assert [r[0] for r in live_history] == ids_of(expected_business(log))
    assert len(live_log) == len(live_history) and open_parts(pg_dsn) == 0
    assert len(live_outbox) == len(live_history)
    assert {status for _, _, status in live_outbox} == {"published"}

    report = rebuild(config, "school", clock=clock)

    assert report.status == "swapped"
    assert history(pg_dsn) == live_history
    assert logged(pg_dsn) == live_log
    assert outbox(pg_dsn) == live_outbox
    assert open_parts(pg_dsn) == 0
    assert rebuild_leftovers(pg_dsn) == CLEAN


class StopWhen(rb.Progress):
    """Interrupts a rebuild (its ``stop`` event) after the batch at which ``condition``
    holds."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition = condition
        self.stop = threading.Event()

    def update(self, done: int, total: int, phase: str) -> None:
        if self.condition():
            self.stop.set()


def test_a_rebuild_after_an_abandoned_one_starts_clean_and_a_second_gives_the_same(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves the rebuild's correlation state is cleaned up: a rebuild interrupted once it
    held a business event leaves correlation records and held events under ``school#rebuild``;
    ``rebuild
    --restart`` throws them away (else their closed windows would make the re-read parts
    duplicates, and the rebuilt history would miss those events) and ends equal to the live
    run; then a second, plain rebuild gives the same again, and nothing of either rebuild's
    own state remains."""
    log = school_log(random.Random(32), changes=150)
    send(services, messages_of(topics, log))
    clock = Clock(tx_ms(log[0]) / 1000)  # nothing closes by idleness: END records close all
    config = make(services, pg_dsn, school(topics, batch=20))
    run_burst(config, clock)
    live = history(pg_dsn), logged(pg_dsn), outbox(pg_dsn)
    assert [r[0] for r in live[0]] == ids_of(expected_business(log))

    interrupted = StopWhen(lambda: rebuild_leftovers(pg_dsn)["outbox"] > 0)  # one held
    report = rebuild(config, "school", clock=clock, progress=interrupted, stop=interrupted.stop)
    assert report.status == "interrupted"
    left = rebuild_leftovers(pg_dsn)
    assert left["correlations"] > 0 and left["outbox"] > 0, left

    assert rebuild(config, "school", clock=clock, restart=True).status == "swapped"
    assert (history(pg_dsn), logged(pg_dsn), outbox(pg_dsn)) == live
    assert rebuild_leftovers(pg_dsn) == CLEAN

    assert rebuild(config, "school", clock=clock).status == "swapped"
    assert (history(pg_dsn), logged(pg_dsn), outbox(pg_dsn)) == live
    assert rebuild_leftovers(pg_dsn) == CLEAN


def enrolment_parts(topics: dict[str, str], tx: Transaction, last: bool) -> list[Message]:
    """An enrolment transaction's STUDENT and COURSE changes with its END record (``last``
    False), or its STUDENT_COURSE change (``last`` True)."""
    if last:
        return [change_message(topics, c) for c in tx.changes if c.table == "student_course"]
    first = [change_message(topics, c) for c in tx.changes if c.table != "student_course"]
    return [*first, end_message(topics, tx)]


def published_ids(services: Services, topic: str, count: int) -> list[str]:
    """The ``projector-event-id`` headers of the outbox topic's messages, read from the start
    until ``count`` arrived (bounded), then a moment more so that an extra one would show."""
    consumer = Consumer(
        {
            "bootstrap.servers": services.kafka,
            "group.id": unique("outbox-reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,  # leaves no offsets behind in the shared Kafka
        }
    )
    consumer.subscribe([topic])
    found: list[str] = []

    def read() -> bool:
        for msg in consumer.consume(num_messages=100, timeout=0.2):
            if msg.error() is None:
                value = dict(msg.headers() or [])["projector-event-id"]
                found.append(value.decode() if isinstance(value, bytes) else str(value))
        return len(found) >= count

    try:
        wait_until(read, f"{count} messages on the outbox topic", 60)
        for _ in range(5):  # what came after: an extra message would be a second publication
            read()
    finally:
        consumer.close()
    return sorted(found)


def test_business_events_still_owed_at_the_swap_are_published_once(
    services: Services, pg_dsn: str, topics: dict[str, str]
) -> None:
    """Proves the outbox hand-off at the swap, with three enrolments beside a background of
    complete transactions (window 1 h, clock before them all: windows close only by their END
    record's counts):

    - X1 is open live and in the rebuild at the swap (its STUDENT_COURSE part is published
      after it): the daemon closes it after the swap, once;
    - X2 is open live, and closed by the rebuild (its last part was published while the daemon
      was stopped): its held business event becomes a pending live row at the swap;
    - Y was never read live (all of it published while the daemon was stopped): the rebuild
      reads further than the live run and names it; it is queued at the swap, as the daemon
      goes on past its parts.

    The background's events, published by the live run, are not queued again. In the end each
    business event is in the outbox once, published, on the outbox topic once, in the history
    once, and the handlers were given each once."""
    log = school_log(random.Random(33), changes=120)
    x1, x2, y = _three_enrolments(log)
    background = [tx for tx in log if tx not in (x1, x2, y)]
    clock = Clock(tx_ms(log[0]) / 1000)
    config = make(services, pg_dsn, school(topics, window="1h"))
    send(services, messages_of(topics, background))
    send(services, [*enrolment_parts(topics, x1, False), *enrolment_parts(topics, x2, False)])
    run_burst(config, clock)
    before = outbox(pg_dsn)
    assert open_parts(pg_dsn) == 2 and {s for *_, s in before} == {"published"}

    send(services, [*enrolment_parts(topics, x2, True), *messages_of(topics, [y])])
    assert rebuild(config, "school", clock=clock).status == "swapped"

    ids = dict(expected_business(log))
    owed = {i for i, _ in expected_business([x2, y])}
    queued = [(i, s) for _, i, s in outbox(pg_dsn) if i not in {b for _, b, _ in before}]
    assert sorted(queued) == sorted((i, "pending") for i in owed)
    assert outbox(pg_dsn)[: len(before)] == before  # the live rows as they were
    assert open_parts(pg_dsn) == 1  # X1, in the rebuilt state
    assert rebuild_leftovers(pg_dsn) == CLEAN

    send(services, enrolment_parts(topics, x1, True))
    run_burst(config, clock)
    everything = sorted(ids)
    assert sorted(i for _, i, _ in outbox(pg_dsn)) == everything
    assert {s for *_, s in outbox(pg_dsn)} == {"published"}
    assert published_ids(services, topics["outbox"], len(everything)) == everything
    assert [r[0] for r in history(pg_dsn)] == everything
    assert sorted(i for i, *_ in logged(pg_dsn)) == everything
    assert open_parts(pg_dsn) == 0


def _three_enrolments(log: Sequence[Transaction]) -> tuple[Transaction, Transaction, Transaction]:
    """The log's last three transactions that create a student, a course and the enrolment."""
    found = [
        tx
        for tx in log
        if len(tx.changes) == 3
        and {(c.table, c.payload["op"]) for c in tx.changes if c.payload}
        == {(t, "c") for t in TABLES}
    ]
    assert len(found) >= 3, "the log has too few new-student-new-course enrolments"
    return found[-3], found[-2], found[-1]


@dataclass
class HistoryReader:
    """Reads the live ``enrolment_history`` in a loop, as a user would, and notes any moment
    it went back: empty after having rows, fewer rows, or a business event gone."""

    dsn: str
    reads: int = 0
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        seen: set[str] = set()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                found = {
                    r[0]
                    for r in conn.execute(
                        "select business_id from school.enrolment_history"
                    ).fetchall()
                }
                if seen and not found:
                    self.violations.append("the history was empty")
                gone = seen - found
                if gone:
                    self.violations.append(f"{len(gone)} business event(s) went missing")
                seen |= found
                self.reads += 1


@pytest.fixture
def reader(pg_dsn: str) -> Iterator[HistoryReader]:
    r = HistoryReader(pg_dsn)
    yield r
    r.stop.set()
    if r.thread is not None:
        r.thread.join(30)


def consumed(pg_dsn: str, projection: str = "school") -> int:
    [(count,)] = rows(
        pg_dsn,
        "select coalesce(sum(next_offset), 0) from projector.checkpoints where projection = %s",
        (projection,),
    )
    return int(count)


def test_readers_never_see_a_partial_history_while_the_daemon_runs(
    services: Services, pg_dsn: str, topics: dict[str, str], reader: HistoryReader
) -> None:
    """Proves the swap of a correlated projection under load: with the daemon running and new
    transactions arriving during the rebuild, a reader querying ``enrolment_history`` in a
    loop never sees it empty or lose a business event; afterwards the history holds exactly
    the rule's business events of the whole log, the handlers were given each once (no
    window closed twice across the swap), each is in the outbox once and published, and no
    correlation is left open."""
    log = school_log(random.Random(34), changes=400)
    messages = messages_of(topics, log)
    first = len(messages) * 3 // 5
    send(services, messages[:first])
    clock = Clock(tx_ms(log[0]) / 1000)
    config = make(services, pg_dsn, school(topics, batch=20))
    expected = ids_of(expected_business(log))
    with running_daemon(config, clock):
        wait_until(lambda: consumed(pg_dsn) == first, "the daemon to read the first part", 120)
        reader.start()
        done: dict[str, rb.RebuildReport] = {}
        thread = threading.Thread(
            target=lambda: done.update(report=rebuild(config, "school", clock=clock))
        )
        thread.start()
        step = (len(messages) - first) // 6 + 1
        for start in range(first, len(messages), step):
            send(services, messages[start : start + step])
        thread.join(300)
        assert not thread.is_alive(), "the rebuild did not finish"
        assert done["report"].status == "swapped"
        wait_until(lambda: [r[0] for r in history(pg_dsn)] == expected, "every event", 120)
        wait_until(lambda: {s for *_, s in outbox(pg_dsn)} == {"published"}, "the publisher", 60)
        reads_after = reader.reads + 20
        wait_until(lambda: reader.reads > reads_after, "the reader to read the swapped view")
    assert reader.violations == []
    assert sorted(i for i, *_ in logged(pg_dsn)) == expected
    assert sorted(i for _, i, _ in outbox(pg_dsn)) == expected
    assert open_parts(pg_dsn) == 0
    assert rebuild_leftovers(pg_dsn) == CLEAN
    print(f"reader: {reader.reads} reads, rebuild read {done['report'].read} messages")


@pytest.fixture
def compacted_topic(services: Services) -> Iterator[str]:
    """A fresh topic with ``cleanup.policy=compact``, deleted afterwards."""
    admin = AdminClient({"bootstrap.servers": services.kafka})
    topic = unique("compacted")
    new = NewTopic(topic, 1, 1, config={"cleanup.policy": "compact"})
    admin.create_topics([new], operation_timeout=30)[topic].result(timeout=30)
    yield topic
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        future.result(timeout=30)


def test_a_compacted_correlation_topic_is_warned_about_at_run_and_rebuild(
    services: Services,
    pg_dsn: str,
    topics: dict[str, str],
    compacted_topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the compaction warning against a real compacted topic: with the STUDENT topic
    compacted (``cleanup.policy=compact``), ``projector run`` warns at start and ``projector
    rebuild`` (a dry run here) warns that its business events can differ, each naming that
    topic and no other."""
    topics = {**topics, "student": compacted_topic}
    config: Config = make(services, pg_dsn, school(topics))
    with caplog.at_level("WARNING", logger="projector.runner.compaction"):
        Daemon(config, exit_when_caught_up=True, clock=Clock(0)).run()
    warned = [r.getMessage() for r in caplog.records if r.name == "projector.runner.compaction"]
    assert len(warned) == 1
    assert f"correlation topic(s) {compacted_topic} have cleanup.policy compact" in warned[0]
    assert "a rebuild of it may name other business events" in warned[0]

    report = rebuild(config, "school", dry_run=True)
    [said] = report.warnings
    assert f"topic(s) {compacted_topic} have" in said
    assert "this rebuild may name other business events than the live run did" in said


def test_status_and_inspect_show_a_projections_correlations(
    services: Services, pg_dsn: str, topics: dict[str, str], tmp_path: Path
) -> None:
    """Proves the correlation figures of ``projector status`` and ``projector inspect``: with
    one enrolment complete and another missing its STUDENT_COURSE part, ``status --json``
    shows one open correlation, the watermark's lag (now minus the lowest input high, as the
    gauge computes it) and the outbox backlog (one row set back to pending, as if not published
    yet); the text form has a correlation table. ``inspect school school:<txId>`` shows the open
    one's parts and END record, and the closed one's window with its business id."""
    log = school_log(random.Random(35), changes=40)
    done, waiting, _ = _three_enrolments(log)
    path = process_config(services, pg_dsn, tmp_path, school(topics, window="1h"))
    send(services, [*messages_of(topics, [done]), *enrolment_parts(topics, waiting, False)])
    run_burst(make(services, pg_dsn, school(topics, window="1h")), Clock(tx_ms(done) / 1000))
    [(closed_id, _)] = expected_business([done])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "update projector.outbox set status = 'pending' where event_id = %s", (closed_id,)
        )
    [(high,)] = rows(pg_dsn, "select min(event_time_high) from projector.checkpoints")

    runner = CliRunner()
    status = runner.invoke(app, ["status", "-c", str(path), "--json", "--sample", "0"])
    assert status.exit_code == 0, status.output
    [item] = json.loads(status.stdout)
    figures = item["correlation"]
    assert (figures["open_correlations"], figures["outbox_pending"]) == (1, 1)
    assert figures["watermark_lag_s"] == pytest.approx(time.time() - high / 1000, abs=60)
    assert 0 <= figures["outbox_oldest_pending_age_s"] < 600
    text = runner.invoke(app, ["status", "-c", str(path), "--sample", "0"])
    assert text.exit_code == 0 and "correlation" in text.stdout and "watermark lag" in text.stdout

    def inspect(tx: Transaction) -> dict[str, Any]:
        stream = f"school:{tx.tx_id}"
        result = runner.invoke(app, ["inspect", "school", stream, "-c", str(path), "--json"])
        assert result.exit_code == 0, result.output
        record: dict[str, Any] = json.loads(result.stdout)["correlation"]
        return record

    opened = inspect(waiting)
    assert sorted(opened["open_parts"]) == ["course", "student"]
    assert opened["end"] is not None and opened["closed"] == [] and opened["due"] is not None
    closed = inspect(done)
    assert closed["open_parts"] == {} and closed["end"] is None
    # The closed window keeps its events' ids (three parts and the END record) for duplicates.
    assert [(w["business_id"], w["events"]) for w in closed["closed"]] == [(closed_id, 4)]
    text = runner.invoke(app, ["inspect", "school", f"school:{waiting.tx_id}", "-c", str(path)])
    assert f"school:{waiting.tx_id}: correlation key {waiting.tx_id}: open parts" in text.stdout
    nothing = runner.invoke(app, ["inspect", "school", "school:nope", "-c", str(path), "--json"])
    assert json.loads(nothing.stdout)["correlation"] is None


def _record(key: str, parts: bool = False, end: bool = False, closed: bool = False) -> Jsonb:
    """A correlation record as the core stores it (``Pending.to_json``), with an open part, a
    waiting END record and a closed window as asked."""
    event = {"id": f"{key}-part", "stream": "s", "type": "c", "data": {}}
    return Jsonb(
        {
            "key": key,
            "parts": {"student": [event]} if parts else {},
            "end": {**event, "id": f"{key}-end"} if end else None,
            "closed": [{"until": 5, "ids": ["x"], "business_id": f"school:{key}:b"}]
            if closed
            else [],
            "closed_until": 5 if closed else None,
        }
    )


def test_the_swap_moves_correlations_and_event_time_and_queues_what_is_owed(
    pg_dsn: str,
) -> None:
    """Proves the PostgreSQL swap's state hand-over on rows set up by hand (no Kafka): the
    live correlation records are replaced by the rebuild's; each partition's event-time high
    becomes the higher of the two (the live one's ``caught_up`` kept), and a partition only the
    rebuild read is carried with its high; of the held business events, those whose key is
    open live (a part, or an END record waiting) or unknown to the live run are queued as
    pending live rows, the one whose key the live run closed is dropped, one queued already
    is not queued twice, and no held row or rebuild state is left."""
    migrate(pg_dsn, "projector", [])
    live, rebuilt, t = "school", "school#rebuild", "cdc.t"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create schema school")
    store = PostgresStore(pg_dsn)
    try:
        swap = PgRebuildStore(store, live, "school")
        swap.start([])
        with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(
                "insert into projector.checkpoints (projection, topic, partition, next_offset,"
                " event_time_high, caught_up) values (%s, %s, %s, %s, %s, %s)",
                [
                    (live, t, 0, 10, 1000, True),
                    (live, t, 1, 5, 3000, False),
                    (rebuilt, t, 0, 10, 2000, False),
                    (rebuilt, t, 1, 5, 2500, False),
                    (rebuilt, t, 2, 3, 100, False),
                ],
            )
            cur.executemany(
                "insert into projector.correlations (projection, key, record) values (%s, %s, %s)",
                [
                    (live, "open", _record("open", parts=True, closed=True)),
                    (live, "waiting", _record("waiting", end=True)),
                    (live, "closed", _record("closed", closed=True)),
                    (rebuilt, "r", _record("r", parts=True)),
                ],
            )
            outbox_rows = [(live, "school:closed:b", "published"), (live, "school:q:b", "pending")]
            outbox_rows += [
                (rebuilt, f"school:{k}:b", "held")
                for k in ("open", "waiting", "closed", "unknown", "q")
            ]
            cur.executemany(
                "insert into projector.outbox (projection, event_id, topic, msg_key, event,"
                " event_ts, status) values (%s, %s, 'out', 'k', %s, 1, %s)",
                [
                    (p, i, Jsonb({"id": i, "meta": {"key": i.split(":")[1]}}), s)
                    for p, i, s in outbox_rows
                ],
            )

        carried = swap.swap(lambda targets: None, 5.0, [(t, 0), (t, 1), (t, 2)])

    finally:
        store.close()
    assert carried == {(t, 0): 10, (t, 1): 5, (t, 2): 3}
    assert rows(
        pg_dsn,
        "select projection, partition, next_offset, event_time_high, caught_up"
        " from projector.checkpoints order by 1, 2",
    ) == [(live, 0, 10, 2000, True), (live, 1, 5, 3000, False), (live, 2, 3, 100, False)]
    assert rows(pg_dsn, "select projection, key from projector.correlations") == [(live, "r")]
    assert rows(
        pg_dsn, "select projection, event_id, status from projector.outbox order by seq"
    ) == [
        (live, "school:closed:b", "published"),
        (live, "school:q:b", "pending"),
        (live, "school:open:b", "pending"),
        (live, "school:waiting:b", "pending"),
        (live, "school:unknown:b", "pending"),
    ]
    assert rows(pg_dsn, "select count(*) from projector.rebuilds") == [(0,)]
