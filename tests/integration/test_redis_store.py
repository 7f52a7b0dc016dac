"""The Redis store against a real Redis: the batch script's checks (fence, key types, counters)
leave nothing half-applied, a conflict means planning again, NOSCRIPT heals, stream ids never
collide in keys."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest
import redis

from projector.apply import LoadedHandler
from projector.core.event import Event
from projector.core.gaps import Gap
from projector.core.message import RawMessage
from projector.core.sequencer import SequenceRules
from projector.runner.batch import BatchApplier
from projector.runner.worker import build_decoders
from projector.store.errors import Fenced, TransientStoreError, WriteConflict
from projector.store.redis import RedisStore
from projector.store.redis_view import RedisView
from tests.conftest import Services
from tests.integration.harness import make_config, projection

pytestmark = pytest.mark.integration

TOPIC = "t"


def wire(stream: str, seq: int, offset: int, kind: str = "ADD", partition: int = 0) -> RawMessage:
    value = {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": {"n": 1}}
    return RawMessage(TOPIC, partition, offset, stream.encode(), json.dumps(value).encode())


def counting(events: Sequence[Event], view: RedisView) -> None:
    """Counts events per stream, and writes ``trap`` as a hash for TRAP events."""
    for e in events:
        view.incrby(f"count:{e.stream}")
        if e.type == "TRAP":
            view.hset("trap", {"by": e.stream})


@pytest.fixture
def client(services: Services) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as c:
        yield c


@pytest.fixture
def make_store(services: Services, redis_prefix: str) -> Iterator[Callable[[], RedisStore]]:
    stores: list[RedisStore] = []

    def make() -> RedisStore:
        stores.append(RedisStore(services.redis_url, redis_prefix))
        return stores[-1]

    yield make
    for s in stores:
        s.close()


def applier_for(
    services: Services,
    pg_dsn: str,
    store: RedisStore,
    handler: Callable[[Sequence[Event], RedisView], None] = counting,
) -> Callable[..., Any]:
    config = make_config(services, pg_dsn, [projection("p", [TOPIC], ["handlers.customers"])])
    applier = BatchApplier(
        "p",
        "p",
        store,
        [LoadedHandler("counting", handler, ())],
        SequenceRules(),
        30.0,
        time.time,
    )
    decoders = build_decoders(config.projections[0])
    return lambda msgs, epochs, **kw: applier.apply(msgs, decoders, epochs, **kw)


def offsets(client: redis.Redis, prefix: str) -> dict[str, str]:
    found: dict[str, str] = client.hgetall(f"{prefix}:s:p:offsets")  # type: ignore[assignment]
    return found


def hash_of(client: redis.Redis, key: str) -> dict[str, str]:
    found: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
    return found


def test_a_stale_epoch_writes_nothing(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves fencing in Redis: after B claims the partition, A's batch is refused by the
    script before any write: no view key, no stream state, no checkpoint."""
    a, b = make_store(), make_store()
    apply_a = applier_for(services, pg_dsn, a)
    epoch_a = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    assert b.claim("p", [(TOPIC, 0)], "b")[(TOPIC, 0)].epoch == epoch_a + 1

    with pytest.raises(Fenced) as info:
        apply_a([wire("s1", 1, 0)], {(TOPIC, 0): epoch_a})

    assert info.value.partitions == [(TOPIC, 0)]
    assert list(client.scan_iter(match=f"{redis_prefix}:v:*")) == []
    assert list(client.scan_iter(match=f"{redis_prefix}:s:p:1:st:*")) == []
    assert offsets(client, redis_prefix) == {}


def test_a_wrongtype_write_leaves_nothing_half_applied_and_becomes_a_dead_letter(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves a handler write that Redis would refuse (HSET on a key that holds a string) is
    caught by the script before anything is written: the first attempt writes no view key,
    no position and no checkpoint, and asks for a re-plan; the re-plan checks each write as it
    is made, so the event at fault becomes a dead letter (its stream halts) and the batch's
    other events are applied once."""
    store = make_store()
    apply = applier_for(services, pg_dsn, store)
    epoch = store.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    client.set(f"{redis_prefix}:v:p:1:trap", "a string")
    batch = [wire("s1", 1, 0), wire("s2", 1, 1), wire("s2", 2, 2, "TRAP"), wire("s1", 2, 3)]

    with pytest.raises(TransientStoreError, match="WRONGTYPE"):
        apply(batch, {(TOPIC, 0): epoch})
    assert list(client.scan_iter(match=f"{redis_prefix}:v:p:1:count:*")) == []
    assert list(client.scan_iter(match=f"{redis_prefix}:s:p:1:st:*")) == []
    assert offsets(client, redis_prefix) == {}

    result = apply(batch, {(TOPIC, 0): epoch})

    [letter] = result.dead_letters
    assert (letter.stream, letter.seq, letter.kind) == ("s2", 2, "handler")
    assert "WRONGTYPE" in letter.reason
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "2"
    assert client.get(f"{redis_prefix}:v:p:1:count:s2") == "1"
    assert client.get(f"{redis_prefix}:v:p:1:trap") == "a string"
    assert client.hget(f"{redis_prefix}:s:p:1:st:s2", "blocked") == "2"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "4"}


def check(store: RedisStore, ops: list[list[str]]) -> list[Any]:
    payload = json.dumps({"fence": [], "ops": ops})
    verdict: list[Any] = store.scripts.call(store.client, "batch", [], "check", payload)
    return verdict


@pytest.mark.parametrize(
    ("setup", "ops", "problem"),
    [
        (
            {"s": "x"},
            [["HSET", "s", "f", "v"]],
            "WRONGTYPE: HSET needs a hash but {p}s is a string",
        ),
        ({"s": "x"}, [["INCRBY", "s", "1"]], "{p}s does not hold an integer"),
        ({"s": "1.5"}, [["INCRBY", "s", "1"]], "{p}s does not hold an integer"),
        ({"s": "x"}, [["INCRBYFLOAT", "s", "1"]], "{p}s does not hold a number"),
        (
            {},
            [["SET", "n", "9000000000000000000"], ["INCRBY", "n", "900000000000000000"]],
            "incrementing {p}n would overflow a 64-bit integer",
        ),
        (
            {},
            [["SADD", "k", "m"], ["ZADD", "k", "1", "m"]],
            "WRONGTYPE: ZADD needs a zset but {p}k is a set",
        ),
        (
            {},
            [["HSET", "h", "f", "abc"], ["HINCRBY", "h", "f", "1"]],
            "field f of {p}h does not hold an integer",
        ),
        ({"s": "1.5\x00abc"}, [["INCRBYFLOAT", "s", "1"]], "{p}s does not hold a number"),
        ({"s": "1e-5000"}, [["INCRBYFLOAT", "s", "1"]], "{p}s does not hold a number"),
        ({"s": "1" * 6000}, [["INCRBYFLOAT", "s", "1"]], "{p}s does not hold a number"),
        ({}, [["SADD", "k", *map(str, range(7001))]], "SADD on {p}k has too many arguments"),
    ],
)
def test_the_script_finds_writes_redis_would_refuse(
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
    setup: dict[str, str],
    ops: list[list[str]],
    problem: str,
) -> None:
    """Proves the script's checks, simulated in op order, catch what would fail half-way in
    Redis (which never rolls a script back): a key of another type, a counter that holds no
    integer or no number, an increment past 64 bits, also when an earlier op of the same
    batch made the key what it is."""
    store = make_store()
    p = f"{redis_prefix}:"
    for key, value in setup.items():
        client.set(p + key, value)
    ops = [[op[0], p + op[1], *op[2:]] for op in ops]

    verdict = check(store, ops)

    assert verdict[0] == "badwrite"
    assert verdict[2] == problem.format(p=p)


def test_writes_redis_accepts_pass_the_checks(
    make_store: Callable[[], RedisStore], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves no false alarm on the normal cases: a DEL then a new type, a DEL forgetting what
    an earlier op wrote in a field, SET then INCRBY of a
    number, INCRBYFLOAT on an integer, counters on missing keys and fields, a removal from a
    missing key (which leaves no key), INCRBY after float increments that add up to a whole
    number (Redis prints it as an integer)."""
    store = make_store()
    p = f"{redis_prefix}:"
    client.set(p + "s", "x")
    ops = [
        ["HSET", p + "h", "f", "abc"],
        ["DEL", p + "h"],
        ["HINCRBY", p + "h", "f", "1"],
        ["DEL", p + "s"],
        ["HSET", p + "s", "f", "1"],
        ["HINCRBY", p + "s", "f", "2"],
        ["HINCRBYFLOAT", p + "s", "g", "0.5"],
        ["SET", p + "n", "41"],
        ["INCRBY", p + "n", "1"],
        ["INCRBYFLOAT", p + "m", "1.5"],
        ["ZINCRBY", p + "z", "3", "m"],
        ["SREM", p + "missing", "m"],
        ["HSET", p + "missing", "f", "v"],
        ["INCRBYFLOAT", p + "w", "1.5"],
        ["INCRBYFLOAT", p + "w", "1.5"],
        ["INCRBY", p + "w", "1"],
    ]
    assert check(store, ops) == ["ok"]


def test_a_concurrent_change_of_a_read_stream_means_planning_again(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the optimistic check: a batch whose stream another instance changed after it was
    read commits nothing (WriteConflict: plan again at once), and the retry applies on top of the
    other's write, so the stream's events are each applied once. (Here the other's first batch
    also creates the version pointer, so the pointer's WATCH fires too; the stream's token
    alone is proved by the test after this one.)"""
    a, b = make_store(), make_store()
    apply_b = applier_for(services, pg_dsn, b)
    a.claim("p", [(TOPIC, 0), (TOPIC, 1)], "a")
    epochs = b.claim("p", [(TOPIC, 0), (TOPIC, 1)], "b")
    epoch = {tp: c.epoch for tp, c in epochs.items()}
    rules = SequenceRules()

    with pytest.raises(WriteConflict, match="planning it again"), b.batch("p", "p") as tx:
        tx.fence({(TOPIC, 1): 1}, epoch)
        position = tx.lock_positions(["s1"], rules)["s1"]
        assert position.last_seq == 0
        apply_b([wire("s1", 1, 0)], {(TOPIC, 0): epoch[(TOPIC, 0)]})  # the other writer
        tx.write_positions([position])
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}


def test_a_stream_written_between_read_and_commit_refuses_the_commit(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the version token that replaced WATCH on the stream hashes: A reads stream s1
    (at seq 1) and plans its seq 3 as parked behind a gap (and s2's seq 1 as applied); while
    A's handler runs, B, another instance on another partition, applies s1's seq 2. Nothing
    else A WATCHes changes (the version pointer exists already, A's handler reads nothing), so
    only the token can tell. A's commit raises the transient "plan again" error and writes
    nothing: its checkpoint, the views, s1's position, parked events and gaps are as B left
    them. A's retry, a fresh batch, reads seq 2 and applies seq 3 at once: each event applied
    once, nothing parked, no gap."""
    a, b = make_store(), make_store()
    apply_b = applier_for(services, pg_dsn, b)
    interfere = [True]

    def meddling(events: Sequence[Event], view: RedisView) -> None:
        if interfere:
            interfere.clear()
            apply_b([wire("s1", 2, 0, partition=1)], {(TOPIC, 1): epoch_b})
        counting(events, view)

    apply_a = applier_for(services, pg_dsn, a, meddling)
    epoch_a = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    epoch_b = b.claim("p", [(TOPIC, 1)], "b")[(TOPIC, 1)].epoch
    interfere.clear()
    apply_a([wire("s1", 1, 0)], {(TOPIC, 0): epoch_a})  # the version pointer, s1 at seq 1
    interfere.append(True)
    s1 = f"{redis_prefix}:s:p:1:st:s1"
    epochs_before = client.hgetall(f"{redis_prefix}:s:p:epochs")

    batch = [wire("s2", 1, 1), wire("s1", 3, 2)]
    with pytest.raises(WriteConflict, match="planning it again"):
        apply_a(batch, {(TOPIC, 0): epoch_a})

    assert not interfere  # B did write in between
    assert client.hgetall(f"{redis_prefix}:s:p:epochs") == epochs_before
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1", f"{TOPIC}:1": "1"}
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "2"
    assert client.get(f"{redis_prefix}:v:p:1:count:s2") is None
    assert not client.exists(f"{redis_prefix}:s:p:1:st:s2")
    stored = hash_of(client, s1)
    assert stored["seq"] == "2" and "p:3" not in stored and "gaps" not in stored
    assert client.get(f"{redis_prefix}:s:p:1:parked") in (None, "0")
    assert client.zcard(f"{redis_prefix}:s:p:1:gaps") == 0

    result = apply_a(batch, {(TOPIC, 0): epoch_a})

    assert result.duplicates == 0
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "3"
    assert client.get(f"{redis_prefix}:v:p:1:count:s2") == "1"
    stored = hash_of(client, s1)
    assert stored["seq"] == "3" and "gaps" not in stored
    assert not [f for f in stored if f.startswith("p:")]
    assert client.get(f"{redis_prefix}:s:p:1:parked") in (None, "0")
    assert client.zcard(f"{redis_prefix}:s:p:1:gaps") == 0
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "3", f"{TOPIC}:1": "1"}


@pytest.mark.parametrize("other", ["batch", "created"])
def test_a_batch_that_only_reads_a_stream_still_sees_it_change(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
    other: str,
) -> None:
    """Proves a stream hash a batch only read (a duplicate: it writes no position there)
    still has its version token checked at commit, whoever wrote it meanwhile: another
    instance's batch, or a batch that created a stream the batch read as absent (token "").
    The commit raises the transient error and moves no checkpoint; the hash keeps the other
    writer's token, and a batch's own writes carry that batch's token. (The gap timer writes
    no stream hash: test_the_gap_timers_writes_leave_the_stream_hashes_and_the_cache_alone.)"""
    a, b = make_store(), make_store()
    apply_a, apply_b = applier_for(services, pg_dsn, a), applier_for(services, pg_dsn, b)
    epoch_a = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    epoch_b = b.claim("p", [(TOPIC, 1)], "b")[(TOPIC, 1)].epoch
    apply_a([wire("s1", 1, 0), wire("s1", 3, 1)], {(TOPIC, 0): epoch_a})  # s1: seq 1, gap 2
    stream = "s9" if other == "created" else "s1"
    key = f"{redis_prefix}:s:p:1:st:{stream}"
    token_before = client.hget(key, "v")
    assert (token_before is None) == (other == "created")

    with pytest.raises(WriteConflict, match="planning it again"), a.batch("p", "p") as tx:
        tx.fence({(TOPIC, 0): 3}, {(TOPIC, 0): epoch_a})
        position = tx.lock_positions([stream], SequenceRules())[stream]
        assert position.last_seq == (0 if other == "created" else 1)
        apply_b([wire(stream, 2 if stream == "s1" else 1, 0, partition=1)], {(TOPIC, 1): epoch_b})
        assert tx.ops() == []  # only read: the batch writes nothing of its own there
        assert tx.versions() == [[key, token_before or ""]]

    token_after = client.hget(key, "v")
    assert token_after and token_after != token_before
    assert offsets(client, redis_prefix)[f"{TOPIC}:0"] == "2"
    with b.batch("p", "p") as probe:  # a batch's writes carry that batch's token
        probe.lock_positions(["s1"], SequenceRules())
        assert probe.versions()[0][1] == client.hget(f"{redis_prefix}:s:p:1:st:s1", "v")


def reads_of(store: RedisStore) -> list[str]:
    """Records the read script's calls on ``store``: its op once per key read ("stream" for
    a stream hash)."""
    calls: list[str] = []
    call = store.scripts.call

    def spy(runner: Any, name: str, keys: Sequence[str], *args: str) -> Any:
        if name == "read":
            calls.extend([args[0]] * len(keys))
        return call(runner, name, keys, *args)

    store.scripts.call = spy  # type: ignore[method-assign]
    return calls


def test_a_stream_the_store_wrote_is_planned_on_without_reading_it_again(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the stream cache saves the read: a batch on streams the store's previous batch
    wrote reads no stream hash, and still applies each event once (seq 2 after seq 1 is
    applied, a repeated seq 1 is a duplicate), exactly as with a fresh read."""
    a = make_store()
    apply_a = applier_for(services, pg_dsn, a)
    epoch = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    apply_a([wire("s1", 1, 0), wire("s2", 1, 1)], {(TOPIC, 0): epoch})
    reads = reads_of(a)

    result = apply_a([wire("s1", 2, 2), wire("s2", 1, 3)], {(TOPIC, 0): epoch})

    assert "stream" not in reads
    assert (result.applied, result.duplicates) == (1, 1)
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "2"
    assert client.get(f"{redis_prefix}:v:p:1:count:s2") == "1"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "4"}


def test_a_cached_stream_another_instance_changed_is_planned_again_from_a_fresh_read(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves a stale cache entry never writes: A caches s1 at seq 1; B, another instance,
    applies s1's seq 2 (a replay on another partition). A, handed seq 2 and 3, plans on its
    cache (seq 2 would be applied a second time): the batch script finds s1's token changed
    and refuses the commit (WriteConflict), writing nothing. A's retry reads s1 afresh: seq 2
    is a duplicate, seq 3 applied, each event counted once."""
    a, b = make_store(), make_store()
    apply_a, apply_b = applier_for(services, pg_dsn, a), applier_for(services, pg_dsn, b)
    epoch_a = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    epoch_b = b.claim("p", [(TOPIC, 1)], "b")[(TOPIC, 1)].epoch
    apply_a([wire("s1", 1, 0)], {(TOPIC, 0): epoch_a})
    apply_b([wire("s1", 2, 0, partition=1)], {(TOPIC, 1): epoch_b})
    batch = [wire("s1", 2, 1), wire("s1", 3, 2)]

    with pytest.raises(WriteConflict, match="planning it again"):
        apply_a(batch, {(TOPIC, 0): epoch_a})

    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "2"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1", f"{TOPIC}:1": "1"}
    assert len(a.streams) == 0
    result = apply_a(batch, {(TOPIC, 0): epoch_a})
    assert (result.applied, result.duplicates) == (1, 1)
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "3"
    assert hash_of(client, f"{redis_prefix}:s:p:1:st:s1")["seq"] == "3"


def test_the_gap_timers_writes_leave_the_stream_hashes_and_the_cache_alone(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the gap timer's schedule writes (here ``gaps request``) touch no stream hash:
    the hash keeps its version token, so the next batch on the stream plans on the store's
    cache, reads nothing and commits at the first try (when they rewrote the hash, 13% of a
    reordered run's batches were planned twice). The schedule it set is what the gap shows."""
    a = make_store()
    apply_a = applier_for(services, pg_dsn, a)
    epoch = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    apply_a([wire("s1", 1, 0), wire("s1", 4, 1)], {(TOPIC, 0): epoch})  # gap 2-3, 4 parked
    key = f"{redis_prefix}:s:p:1:st:s1"
    before = hash_of(client, key)
    now = time.time()

    assert a.request_gaps_now("p", "s1", now) == 1

    assert hash_of(client, key) == before
    [gap] = a.list_gaps("p", "s1")
    assert (gap.from_seq, gap.to_seq, gap.next_request_at) == (2, 3, now)
    reads = reads_of(a)
    result = apply_a([wire("s1", 2, 2)], {(TOPIC, 0): epoch})
    assert reads == []
    assert result.applied == 1
    [gap] = a.list_gaps("p", "s1")
    assert (gap.from_seq, gap.to_seq, gap.next_request_at) == (3, 3, now)


def test_an_event_the_store_parked_is_drained_without_reading_it(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the cache keeps the events a store parked: the batch that fills the gap drains
    them reading nothing from Redis, and applies them once, in order."""
    a = make_store()
    apply_a = applier_for(services, pg_dsn, a)
    epoch = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    apply_a([wire("s1", 1, 0), wire("s1", 3, 1)], {(TOPIC, 0): epoch})
    reads = reads_of(a)

    result = apply_a([wire("s1", 2, 2)], {(TOPIC, 0): epoch})

    assert reads == []
    assert result.applied == 2
    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "3"
    assert not [f for f in hash_of(client, f"{redis_prefix}:s:p:1:st:s1") if f.startswith("p:")]


def test_a_parked_event_drained_by_another_instance_since_the_read_is_a_conflict(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    redis_prefix: str,
) -> None:
    """Proves a batch whose stream hash says an event is parked, but whose value is gone
    when the batch loads it (another instance drained it in between), is planned again from
    fresh reads (WriteConflict, the cache emptied), instead of planning on a parked event
    it cannot load."""
    a, b, c = make_store(), make_store(), make_store()
    apply_a, apply_b = applier_for(services, pg_dsn, a), applier_for(services, pg_dsn, b)
    epoch_a = a.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    epoch_b = b.claim("p", [(TOPIC, 1)], "b")[(TOPIC, 1)].epoch
    apply_a([wire("s1", 1, 0), wire("s1", 3, 1)], {(TOPIC, 0): epoch_a})

    with pytest.raises(WriteConflict), c.batch("p", "p") as tx:
        parked, _ = tx.held_seqs(["s1"])
        assert parked == {"s1": {3}}
        apply_b([wire("s1", 2, 0, partition=1)], {(TOPIC, 1): epoch_b})  # drains seq 3
        tx.load_parked({"s1": [3]})
    assert len(c.streams) == 0


def test_noscript_is_healed(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves a Redis that lost its script cache (SCRIPT FLUSH, a restart) is healed: a claim
    loads the scripts again by itself; a batch commit that met NOSCRIPT committed nothing and
    asks to be planned again, and the next attempt goes through."""
    store = make_store()
    apply = applier_for(services, pg_dsn, store)
    client.script_flush()
    epoch = store.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    apply([wire("s1", 1, 0)], {(TOPIC, 0): epoch})
    client.script_flush()

    try:
        apply([wire("s1", 2, 1)], {(TOPIC, 0): epoch})
    except TransientStoreError as exc:
        assert "scripts" in str(exc)
        assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "1"
        apply([wire("s1", 2, 1)], {(TOPIC, 0): epoch})

    assert client.get(f"{redis_prefix}:v:p:1:count:s1") == "2"
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "2"}


@pytest.mark.parametrize("streams", [["a", "a:b", "a:b:c", "st:a", "a*", "{x}", "ü 1", "p:1"]])
def test_stream_ids_never_share_a_key(
    services: Services, pg_dsn: str, make_store: Callable[[], RedisStore], streams: list[str]
) -> None:
    """Proves distinct stream ids, including ones holding the separator, glob characters,
    hash-tag braces, spaces and non-ASCII, keep distinct state: each stream's position reads
    back as its own after a batch that parks and applies in all of them."""
    store = make_store()
    apply = applier_for(services, pg_dsn, store)
    epoch = store.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch
    batch = [wire(s, seq, i * 3 + seq) for i, s in enumerate(streams) for seq in (1, 3)]
    apply(batch, {(TOPIC, 0): epoch})

    for s in streams:
        report = store.inspect_stream("p", s)
        assert report.position is not None and report.position.last_seq == 1, s
        assert [seq for seq, _ in report.parked] == [3], s
        assert [(g.from_seq, g.to_seq) for g in report.gaps] == [(2, 2)], s
    assert store.count_parked("p") == len(streams)
    assert store.count_open_gaps("p") == len(streams)


def test_a_handler_write_of_thousands_of_values_is_applied_whole(
    make_store: Callable[[], RedisStore], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves a handler's very large writes (a 5,000-field hash, a 9,000-member set, a
    3,000-member sorted set) are recorded in pieces that the script's stack can take, and land
    whole with the checkpoint."""
    store = make_store()
    epoch = store.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch

    def big(events: Sequence[Any], view: RedisView) -> None:
        view.hset("h", {f"f{i}": i for i in range(5000)})
        view.sadd("s", *range(9000))
        view.zadd("z", {f"m{i}": i for i in range(3000)})

    with store.batch("p", "p") as tx:
        tx.fence({(TOPIC, 0): 1}, {(TOPIC, 0): epoch})
        tx.lock_positions(["s1"], SequenceRules())
        tx.run_handlers([big], ["item"])
    ns = f"{redis_prefix}:v:p:1"
    assert (client.hlen(f"{ns}:h"), client.scard(f"{ns}:s"), client.zcard(f"{ns}:z")) == (
        5000,
        9000,
        3000,
    )
    assert offsets(client, redis_prefix) == {f"{TOPIC}:0": "1"}


def test_a_value_that_is_not_unicode_is_the_handlers_error(
    make_store: Callable[[], RedisStore],
) -> None:
    """Proves a string holding a lone surrogate (which Redis's script could not decode) is
    refused when the handler records it, so it is that event's error, not a failed commit."""
    store = make_store()
    with store.batch("p", "p") as tx:
        tx.lock_positions(["s1"], SequenceRules())
        with pytest.raises(ValueError, match="not valid Unicode"):
            tx.run_handlers([lambda _e, view: view.set("k", "a\ud800b")], ["item"])


# The gap timer's schedule lives beside the stream hashes (gapsched), set by compare-and-set:
# what the batches that rewrite a stream's gaps keep of it, what two gap timers deciding one
# gap at once get, and what is left once a gap fills or goes.
NOW = 4_000_000_000.0  # far past every gap's first request time (gap_timeout 30 s)


def claimed(services: Services, pg_dsn: str, store: RedisStore) -> Callable[[list[Any]], Any]:
    """The counting projection on partition 0 of ``store``, claimed: a function applying a
    batch."""
    apply = applier_for(services, pg_dsn, store)
    epochs = {(TOPIC, 0): store.claim("p", [(TOPIC, 0)], "a")[(TOPIC, 0)].epoch}
    return lambda messages: apply(messages, epochs)


def ask(state: str = "open") -> Callable[[Gap], tuple[str, Gap]]:
    """A gap timer's decision: request it (attempt one more), next in 60 s."""

    def decide(gap: Gap) -> tuple[str, Gap]:
        moved = replace(
            gap,
            attempts=gap.attempts + 1,
            last_request_at=NOW,
            next_request_at=NOW + 60,
            state=state,
        )
        return "request", moved

    return decide


def indexes(client: redis.Redis, prefix: str) -> dict[str, Any]:
    base = f"{prefix}:s:p:1"
    return {
        "gaps": client.zrange(f"{base}:gaps", 0, -1),
        "due": client.zrange(f"{base}:gapdue", 0, -1, withscores=True),
        "held": sorted(cast(set[str], client.smembers(f"{base}:gapheld"))),
        "schedules": client.hkeys(f"{base}:gapsched"),
    }


def test_gaps_carved_out_of_a_scheduled_gap_keep_its_schedule_and_filled_leave_nothing(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves a gap that shrinks or splits keeps the schedule the gap timer set on it (attempt,
    next request, held), copied by the batch script from where it stands, so the request it
    made is not made again at once for the pieces; and that once filled, no index entry or
    schedule of it is left behind."""
    store = make_store()
    apply = claimed(services, pg_dsn, store)
    apply([wire("s1", 1, 0), wire("s1", 6, 1)])  # gap 2-5, 6 parked
    decided = store.claim_due_gaps("p", NOW, 10, ask("held"))
    assert [(g.from_seq, g.to_seq, g.attempts) for _, g in decided] == [(2, 5, 1)]

    apply([wire("s1", 2, 2), wire("s1", 4, 3)])  # 2 applied, 4 parked: gaps 3 and 5

    gaps = store.list_gaps("p", "s1")
    assert [(g.from_seq, g.to_seq, g.attempts, g.next_request_at, g.state) for g in gaps] == [
        (3, 3, 1, NOW + 60, "held"),
        (5, 5, 1, NOW + 60, "held"),
    ]
    found = indexes(client, redis_prefix)
    assert found["due"] == [('["s1",3]', NOW + 60), ('["s1",5]', NOW + 60)]
    assert found["held"] == ['["s1",3]', '["s1",5]']
    assert store.claim_due_gaps("p", NOW, 10, ask()) == []

    apply([wire("s1", 3, 4), wire("s1", 5, 5)])

    assert store.list_gaps("p", "s1") == []
    assert indexes(client, redis_prefix) == {"gaps": [], "due": [], "held": [], "schedules": []}


def test_of_two_gap_timers_deciding_one_gap_at_once_only_one_requests_it(
    services: Services, pg_dsn: str, make_store: Callable[[], RedisStore]
) -> None:
    """Proves the compare-and-set: a second instance's gap timer claims the gap between this
    one's read and its write; this one's write is refused and it does not request the gap, so
    the gap gets one request for its first attempt, not two."""
    store = make_store()
    apply = claimed(services, pg_dsn, store)
    apply([wire("s1", 1, 0), wire("s1", 3, 1)])  # gap 2
    other = make_store()
    theirs: list[tuple[str, Gap]] = []

    def decide_while_the_other_claims(gap: Gap) -> tuple[str, Gap]:
        theirs.extend(other.claim_due_gaps("p", NOW, 10, ask()))
        return ask()(gap)

    ours = store.claim_due_gaps("p", NOW, 10, decide_while_the_other_claims)

    assert [(a, g.from_seq, g.attempts) for a, g in theirs] == [("request", 2, 1)]
    assert ours == []
    [gap] = store.list_gaps("p", "s1")
    assert (gap.attempts, gap.next_request_at) == (1, NOW + 60)


def test_a_due_entry_of_a_gap_that_went_is_dropped_not_requested(
    services: Services,
    pg_dsn: str,
    make_store: Callable[[], RedisStore],
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the gap timer finding a due entry whose gap is gone (filled between its read of
    the due index and its write) requests nothing and removes the entry and its schedule, so
    it does not come due again."""
    store = make_store()
    apply = claimed(services, pg_dsn, store)
    apply([wire("s1", 1, 0)])
    base = f"{redis_prefix}:s:p:1"
    client.zadd(f"{base}:gapdue", {'["s1",2]': 1.0})
    client.hset(f"{base}:gapsched", '["s1",2]', '[1,1.0,1.0,"open"]')

    assert store.claim_due_gaps("p", NOW, 10, ask()) == []
    assert indexes(client, redis_prefix) == {"gaps": [], "due": [], "held": [], "schedules": []}
