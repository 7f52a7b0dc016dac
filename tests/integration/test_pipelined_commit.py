"""A sequence-mode batch on PostgreSQL sends its statements without waiting for them, all but
its COMMIT, which ``send_commit`` sends; the daemon builds its next batch meanwhile, behind
that COMMIT on the same connection, and lands the first (``wait_commit``) before sending the
second's. What can go wrong in flight: the database refuses a handler's write at the COMMIT,
the connection dies, another call needs the connection first, the batch ahead of one built
behind it fails."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projector import scenarios
from projector.core import sequencer
from projector.core.decode import Decoder
from projector.core.message import RawMessage
from projector.core.sequencer import StreamPlan, StreamPosition
from projector.runner import batch
from projector.runner.batch import BatchApplier
from projector.runner.worker import build_applier, build_decoders
from projector.store.errors import Fenced, NotPrepared, is_transient
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import (
    make_config,
    migrate_all,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration

TP = ("t", 0)


def wire(stream: str, seq: int, offset: int, **data: object) -> RawMessage:
    kind = "OPENED" if seq == 1 else "DEPOSITED"
    body = {"owner": "o"} if seq == 1 else {"amount": 100, **data}
    value = {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": body}
    return RawMessage(TP[0], TP[1], offset, stream.encode(), json.dumps(value).encode())


@dataclass
class Setup:
    store: PostgresStore
    applier: BatchApplier
    decoders: dict[str, Decoder]
    epochs: dict[tuple[str, int], int]

    def apply(self, messages: list[RawMessage], pipelined: bool = True) -> None:
        """Apply a batch, as the daemon does: pipelined, its COMMIT sent and left in flight."""
        self.prepare(messages, pipelined)
        assert self.store.send_commit()

    def prepare(self, messages: list[RawMessage], pipelined: bool = True) -> None:
        """Apply a batch up to its COMMIT (pipelined), behind the one in flight if any."""
        self.applier.apply(messages, self.decoders, self.epochs, pipelined=pipelined)

    def land_both(self) -> None:
        """As the worker goes on: land the batch in flight, then send the COMMIT of the one
        prepared behind it and land that too."""
        self.store.wait_commit()
        assert self.store.send_commit()
        self.store.wait_commit()


@pytest.fixture
def setup(services: Services, pg_dsn: str) -> Iterator[Setup]:
    """The accounts projection (with deposit tags) on one partition, claimed, and account:1
    opened and committed."""
    config = make_config(
        services, pg_dsn, [projection("accounts", ["t"], ["tests.integration.deferred_fk_handler"])]
    )
    migrate_all(config)
    store = PostgresStore(pg_dsn)
    applier = build_applier(config, config.projections[0], store, time.time)
    assert isinstance(applier, BatchApplier)
    epochs = {TP: store.claim("accounts", [TP], "x")[TP].epoch}
    s = Setup(store, applier, build_decoders(config.projections[0]), epochs)
    s.apply([wire("account:1", 1, 0)], pipelined=False)
    yield s
    store.close()


def balance_and_checkpoint(pg_dsn: str) -> tuple[object, object]:
    [(balance,)] = rows(pg_dsn, "select balance from accounts.accounts where id = '1'")
    [(checkpoint,)] = rows(pg_dsn, "select next_offset from projector.checkpoints")
    return balance, checkpoint


@pytest.fixture
def row_locked(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """Another transaction holding account 1's view row: a batch's write of it waits in the
    database until this connection rolls back."""
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("select 1 from accounts.accounts where id = '1' for update")
        yield conn


def apply_in_thread(setup: Setup, messages: list[RawMessage]) -> threading.Thread:
    worker = threading.Thread(target=setup.apply, args=(messages,), daemon=True)
    worker.start()
    worker.join(10)
    return worker


def test_the_commit_is_sent_without_waiting_and_wait_commit_lands_it(
    setup: Setup, pg_dsn: str, row_locked: psycopg.Connection
) -> None:
    """Proves the commit is left in flight: with account 1's row locked by another
    transaction, so that the batch's upsert waits in the database, applying the batch and
    sending its COMMIT still return (they waited on nothing sent after the handlers' read and
    the fence), and the batch is not committed yet; once the lock goes, ``wait_commit``
    returns and the deposit and the checkpoint are there."""
    worker = apply_in_thread(setup, [wire("account:1", 2, 1)])
    assert not worker.is_alive(), "applying a pipelined batch waited for its writes"
    assert balance_and_checkpoint(pg_dsn) == (0, 1)

    row_locked.rollback()
    setup.store.wait_commit()

    assert balance_and_checkpoint(pg_dsn) == (100, 2)


def test_a_connection_lost_with_the_commit_in_flight_raises_a_transient_error(
    setup: Setup, pg_dsn: str, row_locked: psycopg.Connection
) -> None:
    """Proves a commit in flight on a connection that dies is reported, as a transient error
    (the worker applies the batch again), and that nothing of the batch committed: the same
    batch applied again afterwards deposits once."""
    pid = setup.store.conn.info.backend_pid
    worker = apply_in_thread(setup, [wire("account:1", 2, 1)])
    assert not worker.is_alive()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
    row_locked.rollback()

    with pytest.raises(psycopg.Error) as raised:
        setup.store.wait_commit()
    assert is_transient(raised.value)
    assert balance_and_checkpoint(pg_dsn) == (0, 1)

    setup.apply([wire("account:1", 2, 1)])
    setup.store.wait_commit()
    assert balance_and_checkpoint(pg_dsn) == (100, 2)


def test_a_commit_whose_answer_is_lost_is_never_taken_for_done(setup: Setup, pg_dsn: str) -> None:
    """Proves a COMMIT in flight whose answer never reaches the daemon is reported at
    ``wait_commit`` even though the server committed: a TCP proxy lets the COMMIT through,
    takes the server's answer (the batch asks for it at once, not at the landing) and
    closes the connection. The deposit is in the store; the daemon is told the outcome is
    unknown (a transient error), never that it is done."""
    upstream = conninfo_to_dict(pg_dsn)
    proxy = TcpProxy(str(upstream.get("host") or "127.0.0.1"), int(str(upstream["port"])))
    try:
        setup.store.close()
        upstream.update(host="127.0.0.1", port=str(proxy.port))
        setup.store.dsn = make_conninfo(**upstream)  # type: ignore[arg-type]
        proxy.arm()
        setup.apply([wire("account:1", 2, 1)])
        with pytest.raises(Exception) as raised:
            setup.store.wait_commit()
        assert is_transient(raised.value)
        assert [c.outcome for c in proxy.cuts] == ["COMMIT"]
        assert balance_and_checkpoint(pg_dsn) == (100, 2)
    finally:
        setup.store.close()
        proxy.close()


def test_a_store_closed_with_a_commit_in_flight_reports_it_unknown(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves closing the store does not make a commit in flight look done: the next
    ``wait_commit`` raises a transient error (whether it committed is for the reader of the
    stored checkpoints to tell)."""
    setup.apply([wire("account:1", 2, 1)])
    setup.store.close()
    with pytest.raises(Exception) as raised:
        setup.store.wait_commit()
    assert is_transient(raised.value)
    setup.store.wait_commit()  # reported once


def test_another_call_waits_for_the_commit_in_flight_and_leaves_its_error_to_wait_commit(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves the connection is never used under a commit in flight (a rebalance's claim
    comes in the middle of a poll): another call waits for it, and sees what it did; a
    commit the database refused (a deferred foreign key, checked at the COMMIT) is raised by
    the next ``wait_commit``, once, and the store works on afterwards."""
    setup.apply([wire("account:1", 2, 1, tag="ok")])
    assert setup.store.checkpoints("accounts") == {TP: 2}
    setup.store.wait_commit()

    setup.apply([wire("account:1", 3, 2, tag="unknown")])
    assert setup.store.checkpoints("accounts") == {TP: 2}
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        setup.store.wait_commit()
    setup.store.wait_commit()  # reported once

    setup.apply([wire("account:1", 3, 2, tag="ok")])
    setup.store.wait_commit()
    assert balance_and_checkpoint(pg_dsn) == (200, 3)


def test_a_write_refused_at_the_commit_becomes_a_dead_letter(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the daemon's answer to a handler's write that the database refuses only at the
    COMMIT (a deferred foreign key), when the batch is long out of the handler: the batch's
    commit fails where it lands, the batch is applied again step by step, the refused event
    becomes a dead letter naming the constraint, its stream halts there, and every other
    stream equals the oracle."""
    rng = random.Random(3)
    log = scenarios.account_log(rng, accounts=40, events_per_account=6)
    for w in log:
        if w["type"] == "DEPOSITED":
            w["data"]["tag"] = "ok"
    victim = next(w for w in log if w["stream"] == "account:7" and w["type"] == "DEPOSITED")
    victim["data"]["tag"] = "unknown"
    topic = new_topic(partitions=1)
    publish(services.kafka, topic, log)
    config = make_config(
        services,
        pg_dsn,
        [projection("accounts", [topic], ["tests.integration.deferred_fk_handler"])],
    )
    migrate_all(config)

    with caplog.at_level(logging.WARNING, logger="projector.runner.worker"):
        assert run_until_caught_up(config) == 0

    assert "the batch's commit failed" in caplog.text
    letters = rows(pg_dsn, "select kind, stream, seq, reason from projector.dead_letters")
    assert [(k, s, q) for k, s, q, _ in letters] == [("handler", "account:7", victim["seq"])]
    assert "deposit_tags" in letters[0][3]
    expected = scenarios.accounts_oracle(log)
    views = account_rows(pg_dsn)
    assert {k: v for k, v in views.items() if k != "7"} == {
        k: v for k, v in expected.items() if k != "7"
    }
    assert views["7"]["last_seq"] == victim["seq"] - 1
    [(tags,)] = rows(pg_dsn, "select count(*) from accounts.deposit_tags")
    before_victim = [w for w in log if w["stream"] == "account:7" and w["seq"] < victim["seq"]]
    applied_deposits = [
        w for w in log if w["type"] == "DEPOSITED" and w["stream"] != "account:7"
    ] + [w for w in before_victim if w["type"] == "DEPOSITED"]
    assert tags == len(applied_deposits)


def test_a_batch_built_behind_a_commit_in_flight_reads_what_that_one_wrote(
    setup: Setup, pg_dsn: str, row_locked: psycopg.Connection
) -> None:
    """Proves a batch is built behind the COMMIT in flight, not after it landed, and plans on
    what that batch wrote: with account 1's row locked, the first deposit's upsert waits in
    the database, so the second batch, built in a thread, waits too, at its read; once the
    lock goes it is prepared, though nothing landed the first. Planned on the first's
    position (seq 2, from memory) and its row (balance 100), it deposits on top: 200, the
    checkpoint past both, nothing parked."""
    setup.apply([wire("account:1", 2, 1)])
    worker = threading.Thread(target=setup.prepare, args=([wire("account:1", 3, 2)],))
    worker.start()
    worker.join(1)
    assert worker.is_alive(), "the second batch did not wait behind the first's writes"
    row_locked.rollback()
    worker.join(10)
    assert not worker.is_alive()
    assert balance_and_checkpoint(pg_dsn) == (100, 2), "the first landed; the second is open"

    setup.land_both()

    assert balance_and_checkpoint(pg_dsn) == (200, 3)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]


def test_when_the_batch_in_flight_fails_the_one_built_behind_it_writes_nothing(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves a batch built behind a COMMIT that the database refuses (a deferred foreign
    key) never commits: building it raises ``NotPrepared``, ``wait_commit`` raises the
    refusal, once, and neither batch wrote anything. Applied again in order, the fixed first
    and the second deposit once each."""
    setup.apply([wire("account:1", 2, 1, tag="unknown")])
    with pytest.raises(NotPrepared):
        setup.prepare([wire("account:1", 3, 2, tag="ok")])
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        setup.store.wait_commit()
    setup.store.wait_commit()  # reported once
    assert balance_and_checkpoint(pg_dsn) == (0, 1)

    setup.apply([wire("account:1", 2, 1, tag="ok")])
    setup.prepare([wire("account:1", 3, 2, tag="ok")])
    setup.land_both()
    assert balance_and_checkpoint(pg_dsn) == (200, 3)
    assert rows(pg_dsn, "select count(*) from accounts.deposit_tags") == [(2,)]


def test_a_batch_prepared_behind_is_rolled_back_when_the_connection_is_needed(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves a prepared batch is never committed by accident nor left holding its locks
    when another call needs the connection before its COMMIT is sent (the worker never does
    this; a store must stay right if it did): the call lands the batch in flight, the
    prepared one is rolled back, and ``send_commit`` answers False, so it is planned again."""
    setup.apply([wire("account:1", 2, 1)])
    setup.prepare([wire("account:1", 3, 2)])
    assert setup.store.checkpoints("accounts") == {TP: 2}
    setup.store.wait_commit()
    assert not setup.store.send_commit(), "a rolled-back batch's COMMIT was sent"
    assert balance_and_checkpoint(pg_dsn) == (100, 2)

    setup.apply([wire("account:1", 3, 2)])
    setup.store.wait_commit()
    assert balance_and_checkpoint(pg_dsn) == (200, 3)


def test_a_batch_built_behind_finds_itself_fenced_before_its_commit(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves the fence of a batch built behind a commit in flight holds though its answer is
    read only at the batch's end: another instance claims the partition between the two
    batches; the second is not prepared, and applied again after the first landed it
    raises ``Fenced``. The first committed (it was fenced before the claim); the second
    wrote nothing."""
    setup.apply([wire("account:1", 2, 1)])
    setup.store.wait_commit()
    other = PostgresStore(pg_dsn)
    try:
        setup.apply([wire("account:1", 3, 2)])
        other.claim("accounts", [TP], "y")
        with pytest.raises(NotPrepared):
            setup.prepare([wire("account:1", 4, 3)])
        setup.store.wait_commit()
        with pytest.raises(Fenced):
            setup.prepare([wire("account:1", 4, 3)])
    finally:
        other.close()
    assert balance_and_checkpoint(pg_dsn) == (200, 3)


def test_streams_known_from_memory_are_planned_while_the_read_of_the_others_waits(
    setup: Setup, pg_dsn: str, row_locked: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a batch built behind a commit in flight plans the streams whose positions it
    knows from memory before its read of the others is answered: with account 1's row
    locked, the first batch's write waits in the database, and so does the second batch's
    read of account 2 (new, read and locked); account 1 (written by the first batch) is
    planned meanwhile, account 2 once the read is answered."""
    setup.apply([wire("account:1", 2, 1)])
    planned: list[str] = []
    plan = sequencer.sequence_stream

    def recorded(position: StreamPosition, *args: Any) -> StreamPlan:
        planned.append(position.stream)
        return plan(position, *args)

    monkeypatch.setattr(batch, "sequence_stream", recorded)
    second = [wire("account:1", 3, 2), wire("account:2", 1, 3)]
    worker = threading.Thread(target=setup.prepare, args=(second,), daemon=True)
    worker.start()
    worker.join(1)
    assert worker.is_alive(), "the second batch's read did not wait behind the first"
    assert planned == ["account:1"]

    row_locked.rollback()
    worker.join(10)
    assert planned == ["account:1", "account:2"]
    setup.land_both()
    assert balance_and_checkpoint(pg_dsn) == (200, 4)


def test_a_store_busy_batch_behind_batch_goes_idle_now_and_then_for_autovacuum(
    setup: Setup, pg_dsn: str
) -> None:
    """Proves PostgreSQL learns what a busy store writes while the load lasts. Batches built
    behind one another keep the connection in pipeline mode, and a session that never goes
    idle reports none of its writes to the statistics autovacuum acts on: in a 1M-event
    bench run, 59,668 dead holding rows and 56,342 dead gap records went unreported, so
    unvacuumed, until the run ended. Here three batches, each parking an event, go behind
    one another and the holding table shows no insert; once ``idle_every`` has passed,
    ``plans_ahead`` says to land the batch in flight first, and on that landing the inserts
    show, while batches go on behind one another again after it."""
    s = setup

    def holding_inserts() -> int:
        [(n,)] = rows(
            pg_dsn,
            "select coalesce(sum(n_tup_ins), 0) from pg_stat_user_tables"
            " where schemaname = 'projector' and relname = 'holding'",
        )
        return int(n)

    def builds_behind() -> bool:  # read afresh each time (a property that changes)
        return s.store.plans_ahead

    s.store.idle_every = 3600.0
    before = holding_inserts()
    s.apply([wire("account:2", 1, 1), wire("account:2", 3, 2)])
    for n in range(3, 6):
        assert builds_behind()
        s.prepare([wire(f"account:{n}", 1, 2 * n), wire(f"account:{n}", 3, 2 * n + 1)])
        s.store.wait_commit()
        assert s.store.send_commit()
    assert holding_inserts() == before, "reported without going idle: the premise is gone"
    s.store.idle_every = 0.0
    assert not builds_behind()
    s.store.wait_commit()
    wait_until(lambda: holding_inserts() == before + 4, "the inserts reported")
    assert builds_behind()
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(4,)]
