"""Fencing and serialisation in the store: an instance that lost its partitions can never
write, a new owner sees every batch its predecessor committed, checkpoints never go back, and
two writers of one stream serialise on its position."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from projector.core.message import RawMessage
from projector.runner.worker import build_applier, build_decoders
from projector.store.base import Claim
from projector.store.errors import Fenced, transient_retries
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.harness import make_config, migrate_all, projection, rows

pytestmark = pytest.mark.integration


def wire(
    stream: str, seq: int, topic: str = "t", partition: int = 0, offset: int = 0
) -> RawMessage:
    """An accounts event on the wire: OPENED at seq 1, then deposits of 1."""
    kind, data = ("OPENED", {"owner": "o"}) if seq == 1 else ("DEPOSITED", {"amount": 1})
    value = {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": data}
    return RawMessage(topic, partition, offset, stream.encode(), json.dumps(value).encode())


@pytest.fixture
def setup(services: Services, pg_dsn: str):
    config = make_config(
        services, pg_dsn, [projection("accounts", ["t", "u"], ["handlers.accounts"])]
    )
    migrate_all(config)
    proj = config.projections[0]
    stores: list[PostgresStore] = []

    def make() -> tuple[PostgresStore, Callable[..., object]]:
        store = PostgresStore(pg_dsn)
        stores.append(store)
        applier = build_applier(config, proj, store, time.time)
        decoders = build_decoders(proj)
        return store, lambda msgs, epochs: applier.apply(msgs, decoders, epochs)

    yield make
    for s in stores:
        s.close()


def test_stale_epoch_cannot_write(setup, pg_dsn: str) -> None:
    """Proves fencing: after B claims the partition (a rebalance A never saw), A's batch is
    rolled back whole: no view row, no position, no checkpoint move."""
    store_a, apply_a = setup()
    store_b, _ = setup()
    epoch_a = store_a.claim("accounts", [("t", 0)], "a")[("t", 0)].epoch
    store_b.claim("accounts", [("t", 0)], "b")

    with pytest.raises(Fenced) as info:
        apply_a([wire("account:1", 1)], {("t", 0): epoch_a})
    assert info.value.partitions == [("t", 0)]
    assert rows(pg_dsn, "select count(*) from accounts.accounts") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.positions") == [(0,)]
    assert rows(pg_dsn, "select next_offset, owner from projector.checkpoints") == [(None, "b")]


def test_a_batch_over_two_partitions_names_only_the_one_it_lost(setup, pg_dsn: str) -> None:
    """Proves the fence of every partition of a batch, sent together, is read per partition:
    A owns t[0] and t[1], B takes t[1]; A's batch over both raises Fenced naming t[1] alone
    and writes nothing, not even t[0]'s checkpoint."""
    store_a, apply_a = setup()
    store_b, _ = setup()
    epochs = {tp: c.epoch for tp, c in store_a.claim("accounts", [("t", 0), ("t", 1)], "a").items()}
    store_b.claim("accounts", [("t", 1)], "b")

    with pytest.raises(Fenced) as info:
        apply_a([wire("account:1", 1), wire("account:2", 1, partition=1)], epochs)
    assert info.value.partitions == [("t", 1)]
    assert rows(pg_dsn, "select count(*) from accounts.accounts") == [(0,)]
    assert rows(pg_dsn, "select partition, next_offset from projector.checkpoints order by 1") == [
        (0, None),
        (1, None),
    ]


def test_new_owner_waits_for_the_batch_in_flight_and_resumes_after_it(setup, pg_dsn: str) -> None:
    """Proves a claim taken while the old owner's batch is mid-transaction waits for it and
    then sees its checkpoint, so the partition revoked mid-batch is neither lost nor applied
    twice: the old owner's commit lands, the new owner seeks past it."""
    store_a, _ = setup()
    store_b, _ = setup()
    epoch_a = store_a.claim("accounts", [("t", 0)], "a")[("t", 0)].epoch
    claimed: dict[tuple[str, int], Claim] = {}
    with store_a.batch("accounts", "accounts") as tx:
        tx.fence({("t", 0): 41}, {("t", 0): epoch_a})
        thread = threading.Thread(
            target=lambda: claimed.update(store_b.claim("accounts", [("t", 0)], "b"))
        )
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the claim must wait for the batch holding the checkpoint row"
    thread.join(timeout=10)
    assert claimed[("t", 0)].next_offset == 41


def test_checkpoints_never_go_backwards(setup, pg_dsn: str) -> None:
    """Proves the checkpoint is a high-water mark: re-applying an older batch (a retry after an
    unknown commit outcome) leaves it where it was."""
    store, apply = setup()
    epoch = store.claim("accounts", [("t", 0)], "a")[("t", 0)].epoch
    apply([wire("account:1", 1, offset=0), wire("account:1", 2, offset=1)], {("t", 0): epoch})
    apply([wire("account:1", 1, offset=0)], {("t", 0): epoch})
    assert rows(pg_dsn, "select next_offset from projector.checkpoints") == [(2,)]
    assert rows(pg_dsn, "select applied_events from accounts.accounts") == [(2,)]


def test_two_writers_of_one_stream_serialise(setup, pg_dsn: str) -> None:
    """Proves two instances applying the same stream from two topics at once serialise on the
    stream's position: 200 events split odd/even over two topics and applied concurrently in
    small batches end with every event applied once, in order."""
    store_a, apply_a = setup()
    store_b, apply_b = setup()
    ea = store_a.claim("accounts", [("t", 0)], "a")[("t", 0)].epoch
    eb = store_b.claim("accounts", [("u", 0)], "b")[("u", 0)].epoch
    odd = [wire("account:x", s, "t", 0, i) for i, s in enumerate(range(1, 201, 2))]
    even = [wire("account:x", s, "u", 0, i) for i, s in enumerate(range(2, 201, 2))]
    errors: list[BaseException] = []

    def feed(
        apply: Callable[..., object], msgs: list[RawMessage], epochs: dict[tuple[str, int], int]
    ) -> None:
        try:
            for i in range(0, len(msgs), 5):
                # As the daemon does: a batch refused because the other wrote the stream
                # since this store cached it is a transient error, run again.
                for attempt in transient_retries(attempts=20):
                    with attempt:
                        apply(msgs[i : i + 5], epochs)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=feed, args=(apply_a, odd, {("t", 0): ea})),
        threading.Thread(target=feed, args=(apply_b, even, {("u", 0): eb})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert rows(pg_dsn, "select balance, applied_events, last_seq from accounts.accounts") == [
        (199, 200, 200)
    ]
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
