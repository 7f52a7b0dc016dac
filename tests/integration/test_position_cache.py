"""PostgreSQL plans a batch on the positions its store wrote last, without reading or locking
them, and checks them in the batch's position update instead: here, that it reads nothing for
them, and that a stream another writer wrote since (its position moved, or only an event
parked on it) refuses the batch, which then runs again on locked rows and ends right."""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from projector.core.decode import Decoder
from projector.core.gaps import Gap
from projector.core.message import RawMessage
from projector.runner.batch import BatchApplier
from projector.runner.worker import build_applier, build_decoders
from projector.store.errors import WriteConflict
from projector.store.postgres import CONTENDED_BATCHES, PostgresStore
from tests.conftest import Services
from tests.integration.harness import make_config, migrate_all, projection, rows

pytestmark = pytest.mark.integration

Epochs = dict[tuple[str, int], int]


def wire(stream: str, seq: int, topic: str, offset: int) -> RawMessage:
    kind, data = ("OPENED", {"owner": "o"}) if seq == 1 else ("DEPOSITED", {"amount": seq})
    value = {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": data}
    return RawMessage(topic, 0, offset, stream.encode(), json.dumps(value).encode())


class Writer:
    """One store of the accounts projection (topics t and u) that owns one topic's partition 0,
    as one instance of the daemon would."""

    def __init__(self, config: Any, pg_dsn: str, topic: str) -> None:
        proj = config.projections[0]
        self.store = PostgresStore(pg_dsn)
        applier = build_applier(config, proj, self.store, time.time)
        assert isinstance(applier, BatchApplier)
        self.applier = applier
        self.decoders: dict[str, Decoder] = build_decoders(proj)
        self.topic = topic
        self.epochs: Epochs = {
            (topic, 0): self.store.claim("accounts", [(topic, 0)], topic)[(topic, 0)].epoch
        }
        self.offset = 0
        self.statements: list[str] = []

    def apply(self, *events: tuple[str, int], pipelined: bool = True) -> None:
        """Apply a batch of these events, as the daemon does (pipelined: its commit sent and
        waited for at once); step by step, a batch plans on positions read under their
        locks."""
        messages = []
        for stream, seq in events:
            messages.append(wire(stream, seq, self.topic, self.offset))
            self.offset += 1
        self.applier.apply(messages, self.decoders, self.epochs, pipelined=pipelined)
        if pipelined:
            assert self.store.send_commit()
            self.store.wait_commit()

    def recording(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """Every statement the store's connection sends from now on."""
        conn = self.store.conn
        execute = conn.execute

        def recorded(query: Any, *args: Any, **kwargs: Any) -> Any:
            self.statements.append(f"{query} {args}")  # the statement and its parameters
            return execute(query, *args, **kwargs)

        monkeypatch.setattr(conn, "execute", recorded)
        self.statements.clear()
        return self.statements


@pytest.fixture
def writers(services: Services, pg_dsn: str) -> Iterator[tuple[Writer, Writer]]:
    """Two instances of the accounts projection: ``a`` owns topic t, ``b`` topic u (a replay
    topic, say), both carrying the same streams."""
    config = make_config(
        services, pg_dsn, [projection("accounts", ["t", "u"], ["handlers.accounts"])]
    )
    migrate_all(config)
    a, b = Writer(config, pg_dsn, "t"), Writer(config, pg_dsn, "u")
    try:
        yield a, b
    finally:
        a.store.close()
        b.store.close()


def account(pg_dsn: str, stream: str) -> tuple[int, int, int]:
    [row] = rows(
        pg_dsn,
        "select balance, applied_events, last_seq from accounts.accounts where id = %s",
        (stream.removeprefix("account:"),),
    )
    return row


def locks(statements: list[str]) -> list[str]:
    return [s for s in statements if "for update" in s]


def parked_reads(statements: list[str]) -> list[str]:
    return [s for s in statements if "h.event" in s]


def test_a_batch_on_streams_its_store_wrote_last_reads_and_locks_none_of_them(
    writers: tuple[Writer, Writer], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the round trips saved: once a store has written x and y (left clean) and z
    (its event 3 parked, gap 2-2), its next batches on them send no read or lock of their
    positions (in a 2,000-event batch that lock was the largest statement), nor a read of
    z's parked event, which drains from memory; w, with more events parked than the cache
    keeps a stream with, is still read under its lock; and every event is applied right."""
    a, _ = writers
    a.store._cache("accounts").parked_per_stream = 1
    a.apply(*[("account:x", 1), ("account:y", 1), ("account:z", 1), ("account:z", 3)])
    a.apply(*[("account:w", 1), ("account:w", 3), ("account:w", 4)])
    statements = a.recording(monkeypatch)
    a.apply(("account:x", 2), ("account:y", 2))
    assert locks(statements) == []
    a.apply(("account:x", 3), ("account:z", 2))
    assert locks(statements) == [] and parked_reads(statements) == []
    a.apply(("account:w", 2))
    [lock] = locks(statements)
    assert "account:w" in lock and "account:z" not in lock
    assert len(parked_reads(statements)) == 1
    assert account(pg_dsn, "account:x") == (5, 3, 3)
    assert account(pg_dsn, "account:y") == (2, 2, 2)
    assert account(pg_dsn, "account:z") == (5, 3, 3)
    assert account(pg_dsn, "account:w") == (9, 4, 4)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]


def test_a_stream_kept_with_its_parked_event_that_another_writer_changed_refuses_the_batch(
    writers: tuple[Writer, Writer], pg_dsn: str
) -> None:
    """Proves the parked events and gap records kept in memory are a guess, checked as the
    position is: a holds x at 1 with 3 parked (gap 2-2); b parks x's 5 (gap 4-4). a's batch
    with x's 2, planned from memory, would drain 3 and delete x's gaps, leaving 5 parked
    with no gap record, whose replay nothing would ever ask for; it is refused, and run
    again on what it reads under x's lock it leaves 5 parked behind its gap 4-4."""
    a, b = writers
    a.apply(("account:x", 1), ("account:x", 3))
    b.apply(("account:x", 5))
    with pytest.raises(WriteConflict):
        a.apply(("account:x", 2))
    a.offset -= 1
    a.apply(("account:x", 2))
    assert account(pg_dsn, "account:x") == (5, 3, 3)
    assert rows(pg_dsn, "select stream, seq from projector.holding") == [("account:x", 5)]
    assert rows(pg_dsn, "select from_seq, to_seq from projector.gaps") == [(4, 4)]


def test_a_stream_is_kept_with_its_parked_events_only_when_the_batch_knew_them_all(
    writers: tuple[Writer, Writer], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a stream is kept in memory with its parked events only if the batch knew every
    one: b leaves x at 1 with 4 and 6 parked; a reads x under its lock for a batch with x's
    2 and 8, which loads neither 4 nor 6 (neither can drain) and parks 8. Kept as holding
    only 8, x's next batch would apply 3 from memory, drain nothing, and record 4-7 as
    missing while 4 sits parked. Instead a reads x again, drains 4, and leaves 6 and 8
    parked behind the gaps 5-5 and 7-7."""
    a, b = writers
    b.apply(("account:x", 1), ("account:x", 4), ("account:x", 6))
    a.apply(("account:x", 2), ("account:x", 8))
    statements = a.recording(monkeypatch)
    a.apply(("account:x", 3))
    assert len(locks(statements)) == 1
    assert account(pg_dsn, "account:x") == (9, 4, 4)
    assert rows(pg_dsn, "select seq from projector.holding order by seq") == [(6,), (8,)]
    assert rows(pg_dsn, "select from_seq, to_seq from projector.gaps order by 1") == [
        (5, 5),
        (7, 7),
    ]


def test_a_gap_kept_in_memory_keeps_the_replay_schedule_the_gap_timer_stored(
    writers: tuple[Writer, Writer], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a gap record kept in memory never writes back its schedule: a parks x's 5
    (gap 2-4) and keeps it; the gap timer then asks for it (attempt 1, the next request in
    ten minutes), which moves no version; a's batch with x's 3 plans from memory, where the
    gap is at attempt 0, and splits it: 2-2 and 4-4 both keep the timer's schedule
    (written back as planned, they would be asked for again at once)."""
    a, _ = writers
    a.apply(("account:x", 1), ("account:x", 5))
    now = time.time()

    def asked(gap: Gap) -> tuple[str, Gap]:
        return "request", replace(gap, attempts=1, last_request_at=now, next_request_at=now + 600)

    assert len(a.store.claim_due_gaps("accounts", now + 3600, 10, asked)) == 1
    statements = a.recording(monkeypatch)
    a.apply(("account:x", 3))
    assert locks(statements) == []
    found = rows(
        pg_dsn,
        "select from_seq, to_seq, attempts, next_request_at from projector.gaps order by 1",
    )
    assert [(lo, hi, n) for lo, hi, n, _ in found] == [(2, 2, 1), (4, 4, 1)]
    assert [due.timestamp() for *_, due in found] == pytest.approx([now + 600] * 2, abs=1)
    assert rows(pg_dsn, "select seq from projector.holding order by seq") == [(3,), (5,)]


def test_a_stream_another_writer_moved_refuses_the_batch_which_then_runs_right(
    writers: tuple[Writer, Writer], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a stale cached position never writes: b applies x's seq 3 while a holds x at 2;
    a's batch with x's 4 (which a would park, recording a gap 3-3 that nothing will fill) and
    y's 2 is refused whole at its commit, as a write conflict (which the daemon runs again at
    once), writing nothing; run again it reads x under its lock and applies 4. The next
    batches lock what they plan on, while the other writer may be about, then plan on the
    cache again."""
    a, b = writers
    a.apply(("account:x", 1), ("account:x", 2), ("account:y", 1))
    b.apply(("account:x", 3))
    with pytest.raises(WriteConflict, match="written by another writer"):
        a.apply(("account:x", 4), ("account:y", 2))
    assert account(pg_dsn, "account:y") == (0, 1, 1), "the refused batch wrote y"
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    statements = a.recording(monkeypatch)
    a.offset -= 2  # the same messages again, as the daemon's retry sends them
    a.apply(("account:x", 4), ("account:y", 2))
    assert len(locks(statements)) == 1
    assert account(pg_dsn, "account:x") == (9, 4, 4)
    assert account(pg_dsn, "account:y") == (2, 2, 2)
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]
    for seq in range(3, 2 + CONTENDED_BATCHES):
        a.apply(("account:y", seq))
    assert len(locks(statements)) == CONTENDED_BATCHES
    a.apply(("account:y", 2 + CONTENDED_BATCHES))
    assert len(locks(statements)) == CONTENDED_BATCHES, "the cache was not used again"


def test_a_handler_failing_on_a_view_row_past_a_stale_position_makes_no_dead_letter(
    writers: tuple[Writer, Writer], pg_dsn: str
) -> None:
    """Proves a handler's error caused by a stale cached position is not blamed on an event:
    b applies x's 3; a, holding x at 2, plans x's 3 and 4, and the accounts handler raises
    on the view row (already at 3). The batch runs again step by step, on locked positions,
    where 3 is a duplicate and 4 applies: no dead letter."""
    a, b = writers
    a.apply(("account:x", 1), ("account:x", 2))
    b.apply(("account:x", 3))
    a.apply(("account:x", 3), ("account:x", 4))
    assert account(pg_dsn, "account:x") == (9, 4, 4)
    assert rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)]


@pytest.mark.parametrize("answered", ["at the landing", "while the commit is sent"])
def test_an_event_another_writer_parked_refuses_a_batch_planned_without_it(
    writers: tuple[Writer, Writer], pg_dsn: str, monkeypatch: pytest.MonkeyPatch, answered: str
) -> None:
    """Proves that a write of a stream's holding moves its version even where its position
    stays: b parks x's seq 4 (x at 2 in a's cache); a's batch with x's 3 would otherwise
    apply 3 and leave 4 parked, the gap record 3-3 standing; it is refused and, run again,
    drains 4. The refusal is a write conflict however soon PostgreSQL's answer comes back:
    when the batch lands, or already while its COMMIT is sent (made certain here: before
    the COMMIT goes, the answers asked for are waited for on the socket, so sending the
    COMMIT reads the refusal)."""
    if answered == "while the commit is sent":
        send_commit = PostgresStore.send_commit

        def answered_first(store: PostgresStore) -> bool:
            tx = store._prepared
            if tx is not None:
                tx.conn.pgconn.send_flush_request()
                tx.conn.pgconn.flush()
                select.select([tx.conn.pgconn.socket], [], [], 10)
            return send_commit(store)

        monkeypatch.setattr(PostgresStore, "send_commit", answered_first)
    a, b = writers
    a.apply(("account:x", 1), ("account:x", 2))
    b.apply(("account:x", 4))
    assert rows(pg_dsn, "select stream, seq from projector.holding") == [("account:x", 4)]
    with pytest.raises(WriteConflict):
        a.apply(("account:x", 3))
    a.offset -= 1
    a.apply(("account:x", 3))
    assert account(pg_dsn, "account:x") == (9, 4, 4)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]


@pytest.mark.parametrize("write", ["park", "unpark", "replace_gaps", "mark_skipped"])
def test_every_write_of_a_streams_state_moves_its_version(
    writers: tuple[Writer, Writer], pg_dsn: str, write: str
) -> None:
    """Proves each write of what a cached position stands for (parked events, gap records)
    moves the stream's version, even in a batch that leaves its position where it was: a
    store holding it cached then finds out."""
    a, _ = writers
    a.apply(("account:x", 1), ("account:x", 3))  # 3 parked, gap 2-2
    [gap] = a.store.list_gaps("accounts", "account:x")
    event = a.decoders["t"].decode(wire("account:x", 5, "t", 99))
    assert event is not None

    def version() -> int:
        [(found,)] = rows(
            pg_dsn, "select version from projector.positions where stream = 'account:x'"
        )
        return int(found)

    before = version()
    with a.store.batch("accounts", "accounts") as tx:
        tx.lock_positions(["account:x"], a.applier.rules)
        if write == "park":
            tx.park([event])
        elif write == "unpark":
            tx.unpark([("account:x", 3)])
        elif write == "replace_gaps":
            tx.replace_gaps(["account:x"], [gap])
        else:
            tx.mark_skipped(gap)
    assert version() != before
