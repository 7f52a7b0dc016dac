"""A PostgreSQL batch reads the rows of positions, holding and gaps of its own streams only
(and deletes its parked events so), key by key, whatever the tables hold and whether or not
they were ever analyzed: what it costs is the batch's size, not the projection's. (Joined
against the batch's keys instead, the planner of a database without statistics hashed every
row of the projection for each of these statements, in every batch.) Counted with
``pg_stat_xact_user_tables``: the rows each table gave the batch's own transaction so far."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from projector.core.event import Event
from projector.core.gaps import Gap
from projector.core.sequencer import SequenceRules
from projector.store.postgres import PgBatch
from tests.conftest import Services
from tests.integration.test_parked_seqs import accounts_on_partition_0, wire

pytestmark = pytest.mark.integration

STREAMS = 3000  # each left with seq 1 applied, seq 2 missing (a gap) and seq 3 parked
TOUCHED = [f"account:{n}" for n in range(0, STREAMS, 600)]  # the batch's 5 streams


@contextmanager
def rows_read(tx: PgBatch) -> Iterator[dict[str, int]]:
    """The rows of positions, holding and gaps read inside the block (sequential scans and
    index fetches, bitmap heap scans included), in the batch's transaction."""
    query = (
        "select relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        " from pg_stat_xact_user_tables where schemaname = 'projector'"
        " and relname in ('positions', 'holding', 'gaps')"
    )
    before: dict[str, int] = dict(tx.conn.execute(query).fetchall())
    read: dict[str, int] = {}
    yield read
    after: dict[str, int] = dict(tx.conn.execute(query).fetchall())
    read.update({t: after.get(t, 0) - before.get(t, 0) for t in ("positions", "holding", "gaps")})


def test_a_batch_reads_only_its_own_streams_rows(services: Services, pg_dsn: str) -> None:
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    try:
        names = [f"account:{n}" for n in range(STREAMS)]
        messages = [
            wire(s, seq, i) for i, (s, seq) in enumerate((s, q) for q in (1, 3) for s in names)
        ]
        applier.apply(messages, decoders, epochs)
        [(parked,)] = store.conn.execute("select count(*) from projector.holding").fetchall()
        assert parked == STREAMS

        rules = SequenceRules()
        # The gap records' rewrite is left out: it goes by the streams' keys (an upsert, then a
        # delete of those that went), so that a row another instance's gap timer updated
        # meanwhile is written as it stands (the last test below).
        with store.batch("accounts", "accounts") as tx, tx.rolled_back():
            with rows_read(tx) as read:
                positions = tx.lock_positions(TOUCHED, rules)
                held, _ = tx.held_seqs(TOUCHED)
                loaded = tx.load_parked({s: [3] for s in TOUCHED})
                gaps = tx.load_gaps(TOUCHED)
                tx.unpark([(s, 3) for s in TOUCHED])
            tx.replace_gaps(TOUCHED, [Gap(s, 4, 4, 0.0) for s in TOUCHED])

        # What the batch was told is right...
        assert {s: p.last_seq for s, p in positions.items()} == dict.fromkeys(TOUCHED, 1)
        assert {s: set(seqs) for s, seqs in held.items()} == {s: {3} for s in TOUCHED}
        assert {s: list(events) for s, events in loaded.items()} == {s: [3] for s in TOUCHED}
        assert all(isinstance(e, Event) for events in loaded.values() for e in events.values())
        assert {s: [(g.from_seq, g.to_seq) for g in gs] for s, gs in gaps.items()} == {
            s: [(2, 2)] for s in TOUCHED
        }
        # ... and it took no more than a few rows per stream to know it, of 3,000 in each table.
        assert read["positions"] <= 2 * len(TOUCHED), read
        assert read["holding"] <= 4 * len(TOUCHED), read
        assert read["gaps"] <= 4 * len(TOUCHED), read
    finally:
        store.close()


def test_unpark_and_gap_rewrite_touch_only_the_keys_given(services: Services, pg_dsn: str) -> None:
    """The key-by-key delete of parked events and of gap records removes exactly the rows
    named, and leaves skipped gaps (which a rewrite keeps) in place."""
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    try:
        names = [f"account:{n}" for n in range(10)]
        messages = [
            wire(s, seq, i) for i, (s, seq) in enumerate((s, q) for q in (1, 3, 4) for s in names)
        ]
        applier.apply(messages, decoders, epochs)
        store.conn.execute("update projector.gaps set state = 'skipped' where stream = 'account:1'")
        with store.batch("accounts", "accounts") as tx:
            tx.lock_positions(["account:0", "account:1", "account:2"], SequenceRules())
            tx.unpark([("account:0", 3), ("account:2", 4), ("account:2", 9)])
            tx.replace_gaps(["account:0", "account:1"], [])
            tx.finish()
        holding = store.conn.execute(
            "select stream, seq from projector.holding order by stream, seq"
        ).fetchall()
        gaps = store.conn.execute(
            "select stream, state from projector.gaps order by stream"
        ).fetchall()
        store.conn.rollback()
        expected = {(s, q) for s in names for q in (3, 4)} - {("account:0", 3), ("account:2", 4)}
        assert set(holding) == expected
        # account:0's open gap went; account:1's skipped one stays; the others are untouched.
        assert gaps == [("account:1", "skipped")] + [(s, "open") for s in sorted(names[2:])]
    finally:
        store.close()


def test_a_gap_record_updated_meanwhile_keeps_the_schedule_the_gap_timer_set(
    services: Services, pg_dsn: str
) -> None:
    """Another instance's gap timer updates a gap row (its request schedule) without the
    positions' locks. A batch that rewrites the stream's gaps meanwhile waits for that update,
    then writes the row as it stands: it neither fails on the key nor writes back the schedule
    it read (attempts 7 here, from the sequencer's copy), which would have the gap asked for
    again at once."""
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    stream = "account:0"
    other = psycopg.connect(pg_dsn)
    try:
        applier.apply([wire(stream, 1, 0), wire(stream, 3, 1)], decoders, epochs)
        pid = store.conn.info.backend_pid
        other.execute(
            "update projector.gaps set attempts = attempts + 1 where stream = %s", (stream,)
        )
        failures: list[BaseException] = []

        def rewrite() -> None:
            try:
                with store.batch("accounts", "accounts") as tx:
                    tx.lock_positions([stream], SequenceRules())
                    assert [(g.from_seq, g.to_seq) for g in tx.load_gaps([stream])[stream]] == [
                        (2, 2)
                    ]
                    tx.replace_gaps([stream], [Gap(stream, 2, 2, 0.0, attempts=7)])
            except BaseException as exc:
                failures.append(exc)

        batch = threading.Thread(target=rewrite)
        batch.start()
        waiting = "select wait_event_type from pg_stat_activity where pid = %s"
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 30
            while watcher.execute(waiting, (pid,)).fetchone() != ("Lock",):
                assert batch.is_alive() and time.monotonic() < deadline, failures
                time.sleep(0.01)
        other.commit()  # the timer's update lands while the batch waits on its row
        batch.join(30)
        assert not failures, failures
        rows = store.conn.execute(
            "select from_seq, to_seq, attempts from projector.gaps where stream = %s", (stream,)
        ).fetchall()
        store.conn.rollback()
        assert rows == [(2, 2, 1)]
    finally:
        other.close()
        store.close()
