"""A sequence-mode batch on Redis ends with its commit prepared, not sent; the daemon plans its
next batch from the store's caches (stream hashes, version) while the previous commit runs in
Redis, lands that one, then sends the next. What can go wrong in flight: the commit is refused
(a conflict, a fence) with a batch planned on it already, the connection dies, the store is
closed, another call needs the client first. Redis is held still with ``CLIENT PAUSE WRITE``,
so that a commit sent stays unanswered until the test lets it run."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
import redis

from projector import scenarios
from projector.core.gaps import Gap
from projector.store.errors import Fenced, TransientStoreError, WriteConflict, is_transient
from projector.store.redis import RedisStore
from tests.conftest import Services
from tests.integration.harness import make_config, projection, publish, run_until_caught_up
from tests.integration.test_redis_store import TOPIC, applier_for, offsets, reads_of, wire

pytestmark = pytest.mark.integration

TP = (TOPIC, 0)
PAUSE_MS = 20_000  # far longer than any test waits: the test always unpauses first


@pytest.fixture
def client(services: Services) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as c:
        yield c


@pytest.fixture
def paused(client: redis.Redis) -> Iterator[Callable[[], None]]:
    """Pauses Redis's writes (scripts that write, transactions holding them); yields the
    function that lets them run. Always unpaused at the end."""
    client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    yield lambda: client.execute_command("CLIENT", "UNPAUSE")
    client.execute_command("CLIENT", "UNPAUSE")


@pytest.fixture
def store(services: Services, redis_prefix: str) -> Iterator[RedisStore]:
    s = RedisStore(services.redis_url, redis_prefix)
    yield s
    s.close()


class Applier:
    def __init__(self, services: Services, pg_dsn: str, store: RedisStore) -> None:
        self.apply_messages = applier_for(services, pg_dsn, store)
        self.epoch = {TP: store.claim("p", [TP], "a")[TP].epoch}

    def __call__(self, messages: list[Any], pipelined: bool = True) -> Any:
        return self.apply_messages(messages, self.epoch, pipelined=pipelined)


@pytest.fixture
def apply(services: Services, pg_dsn: str, store: RedisStore) -> Applier:
    """The counting projection on one partition, claimed, and s1's seq 1 committed."""
    a = Applier(services, pg_dsn, store)
    a([wire("s1", 1, 0)], pipelined=False)
    return a


@pytest.fixture
def other_instance(
    services: Services, pg_dsn: str, redis_prefix: str
) -> Iterator[Callable[[], None]]:
    """Another instance on partition 1; the function it yields has it apply s1's seq 2 (a
    replay of the stream the test's store writes on partition 0)."""
    other = RedisStore(services.redis_url, redis_prefix)
    apply_other = applier_for(services, pg_dsn, other)
    epoch = {(TOPIC, 1): other.claim("p", [(TOPIC, 1)], "b")[(TOPIC, 1)].epoch}
    yield lambda: apply_other([wire("s1", 2, 0, partition=1)], epoch)
    other.close()


def count(client: redis.Redis, prefix: str, stream: str) -> str | None:
    return cast(str | None, client.get(f"{prefix}:v:p:1:count:{stream}"))


def returns_within(seconds: float, call: Callable[[], object]) -> bool:
    """Whether ``call`` returns within ``seconds`` (run on a thread: a call that waits for the
    paused Redis would not)."""
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def test_the_block_ends_prepared_and_send_commit_does_not_wait(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    paused: Callable[[], None],
) -> None:
    """Proves the commit is prepared at the block's exit, sent by ``send_commit`` without
    waiting for its answer, and landed by ``wait_commit``: with Redis's writes paused,
    sending returns, and nothing of the batch is there until Redis runs it."""
    apply([wire("s1", 2, 1)])
    assert returns_within(5, store.send_commit), "send_commit waited for the answer"
    assert count(client, redis_prefix, "s1") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}

    paused()
    store.wait_commit()

    assert count(client, redis_prefix, "s1") == "2"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "2"}


def test_the_next_batch_is_planned_while_the_commit_runs(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    paused: Callable[[], None],
) -> None:
    """Proves planning ahead: with batch 2's commit sent and held in Redis, batch 3 (on the
    streams batch 2 writes) is planned at once, reading nothing, from what batch 2 will have
    written; sent after batch 2 lands, it applies on top of it: each event once."""
    apply([wire("s1", 2, 1), wire("s2", 1, 2)])
    store.send_commit()
    reads = reads_of(store)

    assert returns_within(5, lambda: apply([wire("s1", 3, 3), wire("s2", 1, 4)])), (
        "planning the next batch waited for the commit in flight"
    )
    assert reads == []

    paused()
    store.wait_commit()
    store.send_commit()
    store.wait_commit()
    assert count(client, redis_prefix, "s1") == "3"
    assert count(client, redis_prefix, "s2") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "5"}


def test_a_batch_planned_on_a_refused_one_is_not_sent_but_planned_again(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    other_instance: Callable[[], None],
) -> None:
    """Proves a batch planned ahead never commits over a predecessor that failed, nor is sent
    only to be refused: batch 2 (s1's seq 2) is refused, since another instance applied s1's
    seq 2 after batch 2 read it; batch 3 (s1's seq 3), planned on batch 2's outcome, is then
    not sent (``send_commit`` answers False) and nothing of either is written. Planned again,
    from fresh reads, batch 3 applies seq 3 on top of the other instance's seq 2."""
    apply([wire("s1", 2, 1)])
    other_instance()
    assert store.send_commit()
    apply([wire("s1", 3, 2)])

    with pytest.raises(WriteConflict):
        store.wait_commit()
    assert not store.send_commit()

    assert count(client, redis_prefix, "s1") == "2"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1", f"{TOPIC}:1": "1"}
    assert len(store.streams) == 0
    result = apply([wire("s1", 3, 2)])
    assert store.send_commit()
    store.wait_commit()
    assert result.applied == 1
    assert count(client, redis_prefix, "s1") == "3"


def test_a_batch_planned_before_the_gap_timer_asked_for_its_stream_is_sent_as_planned(
    apply: Applier, store: RedisStore, client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the daemon's order (plan the next batch, land the previous one, run the gap
    timer, send) costs no second planning when the gap timer asks for a gap of a stream the
    planned batch read: the batch is sent as planned and commits, and the schedule the gap
    timer set survives the batch's rewrite of the stream's gaps, so the request it made is
    not made again at once, and the gap shows it (``gaps list``, ``inspect``). (When the gap
    timer rewrote the stream hash, the batch was planned again: 13% of a reordered run's
    batches.)"""
    apply([wire("s1", 3, 1)], pipelined=False)  # s1: seq 1, 3 parked, gap 2
    later = time.time() + 3600  # past the gap's first request time (gap_timeout 30 s)

    def ask(gap: Gap) -> tuple[str, Gap]:
        return "request", replace(
            gap, attempts=1, last_request_at=later, next_request_at=later + 60
        )

    apply([wire("s1", 4, 2)])  # planned: 4 parked too; the stream's gap list written again
    decided = store.claim_due_gaps("p", later, 10, ask)
    assert [(action, g.from_seq, g.attempts) for action, g in decided] == [("request", 2, 1)]

    assert store.send_commit()
    store.wait_commit()
    [gap] = store.list_gaps("p", "s1")
    assert (gap.from_seq, gap.to_seq, gap.attempts, gap.next_request_at) == (2, 2, 1, later + 60)
    assert client.zscore(f"{redis_prefix}:s:p:1:gapdue", '["s1",2]') == later + 60
    assert [(g.from_seq, g.attempts) for g in store.inspect_stream("p", "s1").gaps] == [(2, 1)]
    assert store.claim_due_gaps("p", later, 10, ask) == []
    stored = cast(dict[str, str], client.hgetall(f"{redis_prefix}:s:p:1:st:s1"))
    assert sorted(f for f in stored if f.startswith("p:")) == ["p:3", "p:4"]


def test_a_connection_killed_in_flight_raises_a_transient_error(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    paused: Callable[[], None],
) -> None:
    """Proves a commit whose connection dies before its answer is not taken for done, nor
    for a write conflict (which would re-plan at once instead of reconnecting): with the
    commit held in Redis, its connection is killed; ``wait_commit`` raises a transient
    error, nothing of the batch is there, and the store's next batch reconnects."""
    apply([wire("s1", 2, 1)])
    store.send_commit()
    client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    paused()

    with pytest.raises(TransientStoreError, match="lost at the commit") as info:
        store.wait_commit()
    assert is_transient(info.value) and not isinstance(info.value, WriteConflict)
    assert count(client, redis_prefix, "s1") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}
    apply([wire("s1", 2, 1)], pipelined=False)
    assert count(client, redis_prefix, "s1") == "2"


def test_a_commit_lost_while_the_next_batch_is_planned_leaves_none_of_its_guesses(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    paused: Callable[[], None],
) -> None:
    """Proves a batch planned ahead and then not sent leaves nothing of its planned outcome
    in the store's cache when the commit before it was lost meanwhile: batch 3 plans s1 on
    batch 2's expected outcome, then reads the new stream s9, which first waits for batch
    2's answer, lost with its connection (the cache is emptied then); batch 3 is prepared
    all the same, is not sent, and its guesses for s1 and s9 go. (Kept, they let the fault
    suite's next batches plan on what never committed: handlers failed on plays out of
    order, and the commits were refused.)"""
    apply([wire("s1", 2, 1)])
    store.send_commit()
    client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    paused()
    apply([wire("s1", 3, 2), wire("s9", 1, 3)])  # s9 is read: batch 2's answer first

    with pytest.raises(TransientStoreError, match="lost at the commit"):
        store.wait_commit()
    assert not store.send_commit()

    assert store.streams.get(f"{redis_prefix}:s:p:1:st:s1") is None
    assert store.streams.get(f"{redis_prefix}:s:p:1:st:s9") is None
    result = apply([wire("s1", 3, 2), wire("s9", 1, 3)])  # planned again, from Redis
    assert store.send_commit()
    store.wait_commit()
    assert (result.applied, result.parked) == (1, 1)  # s1's seq 2 never committed
    assert (count(client, redis_prefix, "s1"), count(client, redis_prefix, "s9")) == ("1", "1")


@pytest.mark.parametrize("state", ["sent", "prepared"])
def test_closing_the_store_with_a_commit_not_landed_is_reported(
    apply: Applier, store: RedisStore, client: redis.Redis, redis_prefix: str, state: str
) -> None:
    """Proves a commit is never taken for done when the store is closed before it landed
    (the worker closes it to reconnect after a transient error): sent, its answer is not
    waited for; prepared, it is never sent. Either way ``wait_commit`` raises a transient
    error, so the daemon reads the stored checkpoints back instead of trusting it."""
    apply([wire("s1", 2, 1)])
    if state == "sent":
        store.send_commit()

    store.close()
    store.send_commit()

    with pytest.raises(TransientStoreError):
        store.wait_commit()
    store.wait_commit()  # raised once
    if state == "prepared":
        assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}


def test_another_call_waits_for_the_commit_in_flight(
    services: Services,
    pg_dsn: str,
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the store's other calls see the commit in flight as done: ``checkpoints``
    after ``send_commit`` reads the batch's checkpoint. And a refused commit's error is kept
    for the landing: another instance took the partition, the batch is fenced; the call
    that waited for it raises nothing, the next ``wait_commit`` raises ``Fenced``, once."""
    apply([wire("s1", 2, 1)])
    store.send_commit()
    assert store.checkpoints("p") == {TP: 2}
    store.wait_commit()

    other = RedisStore(services.redis_url, redis_prefix)
    try:
        other.claim("p", [TP], "b")
    finally:
        other.close()
    apply([wire("s1", 3, 2)])
    store.send_commit()
    assert store.checkpoints("p") == {TP: 2}
    with pytest.raises(Fenced):
        store.wait_commit()
    store.wait_commit()
    assert count(client, redis_prefix, "s1") == "2"


def test_a_version_swapped_since_the_last_batch_means_planning_again(
    apply: Applier, store: RedisStore, client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the version a batch is planned at (the store's last seen, not read) is checked
    by the batch script: after a rebuild's swap moved the pointer to version 2, a batch
    planned at version 1 writes nothing there and is planned again, at version 2."""
    client.set(f"{redis_prefix}:s:p:version", "2")

    with pytest.raises(WriteConflict):
        apply([wire("s1", 2, 1)], pipelined=False)
    assert count(client, redis_prefix, "s1") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}

    apply([wire("s1", 1, 0), wire("s2", 1, 1)], pipelined=False)
    assert client.get(f"{redis_prefix}:v:p:2:count:s2") == "1"
    assert client.get(f"{redis_prefix}:v:p:2:count:s1") == "1"


def test_a_write_refused_at_the_commit_becomes_a_dead_letter_through_the_daemon(
    services: Services,
    pg_dsn: str,
    redis_prefix: str,
    client: redis.Redis,
    new_topic: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the daemon's answer to a handler's write that the batch script refuses
    (WRONGTYPE) when the next batch is planned already, on the refused one's outcome: the
    refused batch is applied again step by step where it lands, its event at fault becomes a
    dead letter and its stream halts there; the batch planned ahead is refused too where it
    lands (it planned on writes that never happened) and applied again; every other stream
    counts each of its events once."""
    rng = random.Random(5)
    log = scenarios.account_log(rng, accounts=30, events_per_account=8)
    victim = next(w for w in log if w["stream"] == "account:7" and w["seq"] == 3)
    victim["data"]["trap"] = True
    topic = new_topic(partitions=1)
    publish(services.kafka, topic, log)
    config = make_config(
        services,
        pg_dsn,
        [
            projection(
                "p",
                [topic],
                ["tests.integration.redis_trap_handler"],
                store="redis",
                batch_max_messages=25,
            )
        ],
        redis_prefix=redis_prefix,
    )
    client.set(f"{redis_prefix}:v:p:1:trap", "a string")

    with caplog.at_level(logging.INFO):
        assert run_until_caught_up(config) == 0

    assert "the batch's commit failed" in caplog.text
    store = RedisStore(services.redis_url, redis_prefix)
    try:
        [letter] = store.list_dead_letters("p", None, 10)
    finally:
        store.close()
    assert (letter.stream, letter.seq, letter.kind) == ("account:7", 3, "handler")
    assert "WRONGTYPE" in letter.reason
    expected = Counter(w["stream"] for w in log)
    expected["account:7"] = 2
    counts = {
        stream: int(client.get(f"{redis_prefix}:v:p:1:count:{stream}") or 0) for stream in expected
    }
    assert counts == expected


def test_a_batch_that_reads_checks_the_version_it_was_planned_at(
    apply: Applier, store: RedisStore, client: redis.Redis, redis_prefix: str
) -> None:
    """Proves a batch planned at the version the store last saw reads no key of it after a
    swap moved the pointer: its first read (a handler's, here) finds the pointer changed and
    raises the conflict at once (planned again at the new version), rather than handing the
    handler the old version's view."""
    client.set(f"{redis_prefix}:s:p:version", "2")

    with pytest.raises(WriteConflict), store.batch("p", "p") as tx:
        tx.read("get", [f"{redis_prefix}:v:p:1:count:s1"], [])
    assert len(store.streams) == 0 and store.seen_versions == {}


def guessing(store: RedisStore) -> bool:
    """Whether the store plans from its cache and leaves commits in flight."""
    assert store.commits_in_flight == store.plans_ahead
    return store.plans_ahead


def test_after_a_conflict_the_store_reads_before_it_plans_for_a_while(
    apply: Applier,
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
    other_instance: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proves the store stops guessing where another writer is about: after a conflict
    (another instance applied s1's seq 2), the next batches read the streams they plan on,
    even ones the store itself just wrote, and leave no commit in flight; after
    ``CONTENDED_BATCHES`` batches without a conflict, it plans from its cache and pipelines
    again."""
    monkeypatch.setattr("projector.store.redis.CONTENDED_BATCHES", 3)
    other_instance()
    with pytest.raises(WriteConflict):
        apply([wire("s1", 2, 1), wire("s1", 3, 2)], pipelined=False)
    assert not guessing(store)
    reads = reads_of(store)

    apply([wire("s1", 2, 1), wire("s1", 3, 2)], pipelined=False)  # the batch after the conflict
    apply([wire("s1", 4, 3)], pipelined=False)  # s1 as this store wrote it: read all the same

    assert reads.count("stream") == 2
    apply([wire("s1", 5, 4)], pipelined=False)
    assert guessing(store)
    reads.clear()
    apply([wire("s1", 6, 5)], pipelined=False)
    assert reads == []
    assert count(client, redis_prefix, "s1") == "6"
