"""PostgreSQL tells a batch's parked seqs from what is stored beside them (position, gap
records, highest parked seq) instead of reading every holding row: here that is checked
against the holding table itself, after every batch of a delivery with everything that parks."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from projector.core.decode import Decoder
from projector.core.message import RawMessage
from projector.core.sequencer import SequenceRules
from projector.runner.batch import BatchApplier, BatchResult
from projector.runner.worker import build_applier, build_decoders
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.harness import make_config, migrate_all, projection

pytestmark = pytest.mark.integration

STREAMS = [f"account:{n}" for n in range(25)]


def wire(stream: str, seq: int, offset: int, amount: int = 1) -> RawMessage:
    """An accounts event: OPENED at seq 1, then deposits (a negative amount is poison: the
    handler refuses it, so it becomes a dead letter that blocks its stream)."""
    kind, data = ("OPENED", {"owner": "o"}) if seq == 1 else ("DEPOSITED", {"amount": amount})
    value = {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": data}
    return RawMessage("t", 0, offset, stream.encode(), json.dumps(value).encode())


def accounts_on_partition_0(
    services: Services, pg_dsn: str
) -> tuple[PostgresStore, BatchApplier, dict[str, Decoder], dict[tuple[str, int], int]]:
    """The accounts projection on topic t, its store, applier and decoders, partition 0
    claimed."""
    config = make_config(services, pg_dsn, [projection("accounts", ["t"], ["handlers.accounts"])])
    migrate_all(config)
    proj = config.projections[0]
    store = PostgresStore(pg_dsn)
    applier = build_applier(config, proj, store, time.time)
    assert isinstance(applier, BatchApplier)
    epochs = {("t", 0): store.claim("accounts", [("t", 0)], "x")[("t", 0)].epoch}
    return store, applier, build_decoders(proj), epochs


def stored_truth(
    store: PostgresStore,
) -> tuple[dict[str, set[int]], dict[str, set[tuple[int, int]]]]:
    parked: dict[str, set[int]] = {}
    for stream, seq in store.conn.execute("select stream, seq from projector.holding"):
        parked.setdefault(stream, set()).add(seq)
    skipped: dict[str, set[tuple[int, int]]] = {}
    for stream, lo, hi in store.conn.execute(
        "select stream, from_seq, to_seq from projector.gaps where state = 'skipped'"
    ):
        skipped.setdefault(stream, set()).add((lo, hi))
    store.conn.rollback()
    return parked, skipped


def read_by_the_store(
    store: PostgresStore, rules: SequenceRules
) -> tuple[dict[str, set[int]], dict[str, set[tuple[int, int]]]]:
    with store.batch("accounts", "accounts") as tx, tx.rolled_back():
        tx.lock_positions(STREAMS, rules)
        parked, skipped = tx.held_seqs(STREAMS)
    return (
        {s: set(seqs) for s, seqs in parked.items()},
        {s: set(ranges) for s, ranges in skipped.items()},
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parked_seqs_as_told_match_the_holding_table_after_every_batch(
    services: Services, pg_dsn: str, seed: int
) -> None:
    """Proves the reconstruction after every batch of a random delivery: 25 streams of 60
    events, shuffled within windows, with duplicates, withheld seqs (some sent late, some
    never), a poison event in three streams (dead letter: the stream blocks and parks what
    follows; one of them retried after a fix, by skipping it), and gaps given up on (policy
    skip) part-way: the parked seqs and skipped ranges the store tells a batch are exactly
    the holding table's rows and the skipped gap records."""
    rng = random.Random(seed)
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    poison = {(s, rng.randrange(5, 40)) for s in rng.sample(STREAMS, 3)}
    log = [(s, q) for q in range(1, 61) for s in STREAMS]
    withheld = {e for e in log if e[1] > 1 and rng.random() < 0.06}
    late = {e for e in withheld if rng.random() < 0.5}
    sent = [e for e in log if e not in withheld]
    sent += [e for e in sent if rng.random() < 0.05]  # duplicates
    order = sorted(range(len(sent)), key=lambda i: i + rng.uniform(0, 120))
    sent = [sent[i] for i in order] + sorted(late)
    offset = 0
    try:
        while sent:
            size = rng.randrange(1, 80)
            batch, sent = sent[:size], sent[size:]
            messages = []
            for stream, seq in batch:
                amount = -5 if (stream, seq) in poison else 1
                messages.append(wire(stream, seq, offset, amount))
                offset += 1
            applier.apply(messages, decoders, epochs)
            if rng.random() < 0.15:  # give up on a gap, as the skip policy does
                gaps = [g for g in store.list_gaps("accounts") if g.state != "skipped"]
                if gaps:
                    with store.batch("accounts", "accounts") as tx:
                        applier.skip_gap(tx, rng.choice(gaps), BatchResult())
            assert read_by_the_store(store, applier.rules) == stored_truth(store)
        truth = stored_truth(store)
        assert truth[0], "nothing parked at the end: the check proved little"
    finally:
        store.close()


def test_the_streams_state_is_read_with_their_locks_in_one_round_trip(
    services: Services, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a batch learns its streams' parked seqs and gaps with the lock: the position
    rows and the gap records (with each stream's highest parked seq) go out in one pipeline,
    and held_seqs and load_gaps then send nothing. Each round trip is a wait on a 2-core
    machine shared with PostgreSQL and Kafka; a reordered batch made four before planning.
    And that a stream whose holding the batch wrote is not answered from that read."""
    store, applier, decoders, epochs = accounts_on_partition_0(services, pg_dsn)
    a, b, c = STREAMS[:3]
    sent = [(a, 1), (a, 2), (a, 5), (a, 9), (b, 1), (b, 4), (c, 1), (c, 2)]
    applier.apply([wire(s, q, i) for i, (s, q) in enumerate(sent)], decoders, epochs)
    try:
        with store.batch("accounts", "accounts") as tx, tx.rolled_back():
            statements: list[str] = []
            execute = tx.conn.execute

            def counted(query: Any, *args: Any, **kwargs: Any) -> Any:
                statements.append(str(query))
                return execute(query, *args, **kwargs)

            monkeypatch.setattr(tx.conn, "execute", counted)
            tx.lock_positions([a, b, c], applier.rules)
            assert len(statements) == 2, statements
            parked, skipped = tx.held_seqs([a, b, c])
            gaps = tx.load_gaps([a, b, c])
            assert len(statements) == 2, statements[2:]
            assert {s: sorted(seqs) for s, seqs in parked.items()} == {a: [5, 9], b: [4]}
            assert skipped == {}
            assert {s: [(g.from_seq, g.to_seq) for g in gs] for s, gs in gaps.items()} == {
                a: [(3, 4), (6, 8)],
                b: [(2, 3)],
            }
            tx.unpark([(a, 5)])
            with pytest.raises(RuntimeError, match="not locked since their last write"):
                tx.held_seqs([a])
            tx.lock_positions([a], applier.rules)  # read again with the lock: answered
            assert a in tx.held_seqs([a])[0]
    finally:
        store.close()
