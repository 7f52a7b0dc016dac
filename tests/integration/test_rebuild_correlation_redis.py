"""``projector rebuild`` of a correlated projection kept in Redis (issue 12, docs/correlation.md
"Redis rebuild as built"), against real Kafka and Redis: the school projection with
``store: redis`` (documents by ``handlers.profiles_redis``, the history by
``handlers.school_history_redis``, the business events counted by
``tests.integration.business_log_redis``) is rebuilt into a new version of its keys and
flipped in, its business events also published through the Redis outbox. The scenarios of
:mod:`tests.integration.test_rebuild_correlation`, plus the swap's hand-over of event-time
progress on keys set up by hand. The outbox is read back by restating the documented layout
(docs/redis.md): ``outbox:ids`` holds each business event's id, ``+inf`` while queued."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from projector.cdc_scenario import school_log
from projector.cli import app
from projector.config import Config
from projector.core.correlate import ClosedWindow, InputTime, Pending
from projector.core.event import Event
from projector.runner.rebuild import RebuildReport, rebuild
from projector.store.redis import RedisStateCorrupt, RedisStore
from projector.store.redis_rebuild import RedisRebuildStore
from tests.conftest import Services
from tests.integration.gaps_harness import running_daemon, wait_until
from tests.integration.test_correlation import Clock, expected_business, run_burst, send, tx_ms
from tests.integration.test_correlation_redis import RedisBackend
from tests.integration.test_rebuild_correlation import (
    StopWhen,
    _three_enrolments,
    enrolment_parts,
    ids_of,
    messages_of,
    published_ids,
    topics,
)

pytestmark = pytest.mark.integration

__all__ = ["topics"]  # the fixture: the school's topics and the outbox topic

HANDLERS = ["handlers.school_history", "tests.integration.business_log"]  # as _redis flavours


@pytest.fixture
def backend(services: Services, pg_dsn: str, redis_prefix: str) -> RedisBackend:
    return RedisBackend(services, pg_dsn, redis_prefix)


@pytest.fixture
def client(services: Services) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as c:
        yield c


def school(
    backend: RedisBackend, topics: dict[str, str], batch: int = 50, **correlation: Any
) -> Config:
    """The school projection on Redis with an outbox, ``batch`` messages at most per batch,
    its correlation section updated by ``correlation``."""
    proj = backend.projection(topics, HANDLERS, outbox={"topic": topics["outbox"]}, **correlation)
    return backend.make({**proj, "batch_max_messages": batch})


def outbox(client: redis.Redis, prefix: str) -> dict[str, str]:
    """Each business event id in the live outbox: ``pending`` (queued) or ``published``."""
    scores: Any = client.zrange(f"{prefix}:s:school:outbox:ids", 0, -1, withscores=True)
    return {str(i): "pending" if s == float("inf") else "published" for i, s in scores}


def views(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every view key of the version readers read, with its value: the documents, the history
    (hashes and sorted sets) and the business log (with how often each event was applied)."""
    active = str(client.get(f"{prefix}:v:school:active"))
    ns = f"{prefix}:v:school:{active}:"
    out: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{ns}*", count=1000):
        kind = client.type(key)
        if kind == "hash":
            value: Any = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.get(key)
        out[key[len(ns) :]] = value
    return out


def times(client: redis.Redis, prefix: str, projection: str = "school") -> dict[str, str]:
    """A projection's ``times`` hash (``topic:partition`` → ``"<high>,<0|1>"``)."""
    stored = client.hgetall(f"{prefix}:s:{projection}:times")
    return {str(tp): str(value) for tp, value in stored.items()}


def highs(stored: dict[str, str]) -> dict[str, int | None]:
    return {tp: int(v.split(",")[0]) if v.split(",")[0] else None for tp, v in stored.items()}


def leftovers(client: redis.Redis, prefix: str) -> list[str]:
    """What a rebuild should not leave behind once it swapped: keys of its own (fence,
    checkpoints, event-time progress, target version), the lock, the pause, and keys of a
    swapped-out version without an expiry, and held business events in the live version."""
    found = sorted(client.scan_iter(match=f"{prefix}:s:school#rebuild:*", count=1000))
    found += [
        k
        for k in (f"{prefix}:s:school:rebuilding", f"{prefix}:s:school:paused")
        if client.exists(k)
    ]
    live = int(client.get(f"{prefix}:s:school:version") or 1)
    found += list(client.scan_iter(match=f"{prefix}:s:school:{live}:cohold*", count=1000))
    for old in range(1, live):
        for pattern in (f"{prefix}:s:school:{old}:*", f"{prefix}:v:school:{old}:*"):
            found += [k for k in client.scan_iter(match=pattern, count=1000) if client.pttl(k) < 0]
    return found


def test_a_redis_rebuild_names_the_live_runs_business_events(
    backend: RedisBackend, topics: dict[str, str], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves "a rebuild yields the same business events" on Redis: a live run names the
    business events of a school log (one transaction in five without its END record, so its
    window expires; the injected clock lets the idle watermark pass every window at the end);
    ``rebuild`` builds the projection again into a new version and flips it in. Every view key
    of the new version equals the live one's (documents, history hashes and sorted sets, and
    the business log with each event applied once), the history's ids are the rule's, no
    correlation is open, the outbox gained nothing (every id published by the live run, none
    queued again, none held left), no partition's event-time high went back at the swap (the
    live ``caught_up`` flags kept), and nothing of the rebuild is left but the old version's
    keys, expiring."""
    log = school_log(random.Random(31), changes=150)
    send(backend.services, messages_of(topics, log, without_end=range(0, len(log), 5)))
    clock = Clock(tx_ms(log[-1]) / 1000 + 60)  # window 10 s + idle_after 30 s: all close
    config = school(backend, topics)
    run_burst(config, clock)
    live, live_times = views(client, redis_prefix), times(client, redis_prefix)
    live_outbox = outbox(client, redis_prefix)
    assert [i for i, _ in backend.history()] == ids_of(expected_business(log))
    assert len(backend.business_log()) == len(backend.history())
    assert backend.open_parts() == 0
    assert live_outbox == dict.fromkeys(ids_of(expected_business(log)), "published")

    assert rebuild(config, "school", clock=clock).status == "swapped"

    assert client.get(f"{redis_prefix}:v:school:active") == "2"
    assert views(client, redis_prefix) == live
    assert outbox(client, redis_prefix) == live_outbox
    assert client.xlen(f"{redis_prefix}:s:school:outbox") == 0
    assert backend.open_parts() == 0
    after = times(client, redis_prefix)
    assert set(after) == set(live_times)
    for tp, high in highs(after).items():
        before = highs(live_times)[tp]
        assert before is None or (high is not None and high >= before), tp
        assert after[tp].endswith(live_times[tp][-2:]), tp  # caught_up: the live owner's
    assert leftovers(client, redis_prefix) == []


def test_a_redis_rebuild_after_an_abandoned_one_starts_clean_and_a_second_gives_the_same(
    backend: RedisBackend, topics: dict[str, str], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the rebuild's correlation state is cleaned up on Redis, its event-time progress
    above all: a rebuild interrupted once it had read every partition past the log's middle
    leaves its ``times`` (each partition's high past that), its records and its version;
    ``rebuild --restart`` throws them away (kept, the restarted rebuild's watermark would
    stand past the middle from its first batch, and the windows of the first half would close
    on their first part: other business events) and ends equal to the live run, the outbox
    untouched; then a second, plain rebuild gives the same again, and nothing of either
    rebuild is left."""
    log = school_log(random.Random(32), changes=150)
    messages = messages_of(topics, log)
    send(backend.services, messages)
    clock = Clock(tx_ms(log[0]) / 1000)  # nothing closes by idleness: END records close all
    config = school(backend, topics, batch=20)
    run_burst(config, clock)
    live, live_outbox = views(client, redis_prefix), outbox(client, redis_prefix)
    assert [i for i, _ in backend.history()] == ids_of(expected_business(log))

    middle = tx_ms(log[len(log) // 2])

    def half_read() -> bool:
        """Every partition read past the log's middle (half of it still to read, far more
        than the batch the rebuild would swap within)."""
        left = highs(times(client, redis_prefix, "school#rebuild"))
        return len(left) == 8 and all(h and h >= middle for h in left.values())  # 4 topics

    interrupted = StopWhen(half_read)
    report = rebuild(config, "school", clock=clock, progress=interrupted, stop=interrupted.stop)
    assert report.status == "interrupted"
    assert half_read() and client.exists(f"{redis_prefix}:s:school#rebuild:target")

    assert rebuild(config, "school", clock=clock, restart=True).status == "swapped"
    assert views(client, redis_prefix) == live
    assert outbox(client, redis_prefix) == live_outbox
    assert leftovers(client, redis_prefix) == []

    assert rebuild(config, "school", clock=clock).status == "swapped"
    assert client.get(f"{redis_prefix}:v:school:active") == "3"
    assert views(client, redis_prefix) == live
    assert outbox(client, redis_prefix) == live_outbox
    assert backend.open_parts() == 0
    assert leftovers(client, redis_prefix) == []


def test_a_correlation_open_live_at_the_redis_swap_is_closed_once_after_it(
    backend: RedisBackend, topics: dict[str, str], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the swap hands the correlations over on Redis, with three enrolments beside a
    background of complete transactions (window 1 h, clock before them all: windows close
    only by their END record's counts):

    - X1 is open live and in the rebuild at the swap (its STUDENT_COURSE part is published
      after it): the daemon closes it after the swap, from the rebuilt record, once;
    - X2 is open live and closed by the rebuild (its last part was published while the daemon
      was stopped): the rebuilt record replaces the live one, so the daemon, going on past
      that part, never closes it again; its held business event is queued at the swap;
    - Y was never read live: the rebuild names it, and it is queued at the swap.

    The background's events, published by the live run, are not queued again. In the end
    each business event is published once (on the outbox topic once), in the history once,
    and the handlers were given each once (the business log counts every application)."""
    log = school_log(random.Random(33), changes=120)
    x1, x2, y = _three_enrolments(log)
    background = [tx for tx in log if tx not in (x1, x2, y)]
    clock = Clock(tx_ms(log[0]) / 1000)
    config = school(backend, topics, window="1h")
    send(backend.services, messages_of(topics, background))
    send(
        backend.services,
        [*enrolment_parts(topics, x1, False), *enrolment_parts(topics, x2, False)],
    )
    run_burst(config, clock)
    assert backend.open_parts() == 2
    before = outbox(client, redis_prefix)
    assert set(before.values()) == {"published"}

    send(backend.services, [*enrolment_parts(topics, x2, True), *messages_of(topics, [y])])
    assert rebuild(config, "school", clock=clock).status == "swapped"
    everything = ids_of(expected_business(log))
    [x1_id] = ids_of(expected_business([x1]))
    owed = ids_of(expected_business([x2, y]))
    assert outbox(client, redis_prefix) == {**before, **dict.fromkeys(owed, "pending")}
    assert backend.open_parts() == 1  # X1, in the rebuilt state
    assert [i for i, _ in backend.history()] == [i for i in everything if i != x1_id]
    assert leftovers(client, redis_prefix) == []

    send(backend.services, enrolment_parts(topics, x1, True))
    run_burst(config, clock)
    assert outbox(client, redis_prefix) == dict.fromkeys(everything, "published")
    assert published_ids(backend.services, topics["outbox"], len(everything)) == everything
    assert [i for i, _ in backend.history()] == everything
    assert sorted(i for i, *_ in backend.business_log()) == everything  # each applied once
    assert backend.open_parts() == 0


def test_a_redis_rebuild_while_the_daemon_runs_applies_each_business_event_once(
    backend: RedisBackend, topics: dict[str, str], client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the swap of a correlated Redis projection under load: with the daemon running
    (its batches and idle ticks paused by the swap, then planned again on the new version) and
    new transactions arriving during the rebuild, the history ends holding exactly the rule's
    business events of the whole log, the handlers were given each once (no window closed
    twice across the flip, none lost), each is in the outbox once and published, no
    correlation is open and nothing of the rebuild is left."""
    log = school_log(random.Random(34), changes=300)
    messages = messages_of(topics, log)
    first = len(messages) * 3 // 5
    send(backend.services, messages[:first])
    clock = Clock(tx_ms(log[0]) / 1000)
    config = school(backend, topics, batch=20)
    expected = ids_of(expected_business(log))
    with running_daemon(config, clock):
        wait_until(lambda: backend.consumed() == first, "the daemon to read the first part", 120)
        done: dict[str, RebuildReport] = {}
        thread = threading.Thread(
            target=lambda: done.update(report=rebuild(config, "school", clock=clock))
        )
        thread.start()
        step = (len(messages) - first) // 6 + 1
        for start in range(first, len(messages), step):
            send(backend.services, messages[start : start + step])
        thread.join(300)
        assert not thread.is_alive(), "the rebuild did not finish"
        assert done["report"].status == "swapped"
        wait_until(
            lambda: [i for i, _ in backend.history()] == expected, "every business event", 120
        )
        everything = dict.fromkeys(expected, "published")
        wait_until(lambda: outbox(client, redis_prefix) == everything, "the publisher", 60)
    assert sorted(i for i, *_ in backend.business_log()) == expected
    assert backend.open_parts() == 0
    assert leftovers(client, redis_prefix) == []


def _record(key: str, open_part: bool) -> Pending:
    """A correlation record: one open part, or one closed window."""
    if open_part:
        part = Event(f"s:{key}", None, 5, "c", {}, f"{key}-part")
        return Pending(key, parts={"student": (part,)})
    return Pending(key, closed=(ClosedWindow(5, frozenset({f"{key}/1"}), None),), closed_until=5)


def test_the_redis_swap_carries_event_time_over_and_flips_the_correlation_records(
    services: Services, client: redis.Redis, redis_prefix: str
) -> None:
    """Proves the Redis swap's hand-over on keys set up through the store (no Kafka), and the
    cleanup of the rebuild's event-time progress: ``abandon`` (and so ``--restart`` and a fresh
    start) deletes the rebuild's ``times`` with its fence, records and version. At the swap,
    each partition's live high becomes the higher of the live and the rebuilt one (a high
    never goes back; an empty one counts as none), the live ``caught_up`` is kept, a
    partition only the rebuild read is carried with its high (not caught up, as PostgreSQL's
    new checkpoint row); the live correlation records are replaced by the rebuild's (the
    version flip: the rebuilt record, its due index and open set are what the daemon reads);
    and no key of the rebuild is left. A live ``times`` value that is not ``<high>,<0|1>``
    stops the swap as damaged state before it writes anything."""
    t = "cdc.t"
    tps = [(t, p) for p in range(5)]
    store = RedisStore(services.redis_url, redis_prefix)
    try:
        live_epochs = {tp: c.epoch for tp, c in store.claim("school", tps, "live").items()}
        with store.batch("school", "school") as tx:
            tx.fence({(t, 0): 10, (t, 1): 5, (t, 3): 4, (t, 4): 2}, live_epochs)
            tx.write_input_times(
                {
                    (t, 0): InputTime(1000, caught_up=True),
                    (t, 1): InputTime(3000),
                    (t, 3): InputTime(700, caught_up=True),
                    (t, 4): InputTime(None, caught_up=True),
                }
            )
            tx.write_correlations([(_record("live", open_part=True), 9)], [])
        swap = RedisRebuildStore(store, "school", "school")

        def build(record: str) -> None:
            """The rebuild's fence, checkpoints, event-time progress and one record."""
            swap.start([])
            epochs = {tp: c.epoch for tp, c in store.claim("school#rebuild", tps, "r").items()}
            with store.batch("school#rebuild", "school") as tx:
                tx.fence({(t, 0): 10, (t, 1): 5, (t, 2): 3, (t, 3): 4, (t, 4): 2}, epochs)
                tx.write_input_times(
                    {
                        (t, 0): InputTime(2000),
                        (t, 1): InputTime(2500),
                        (t, 2): InputTime(100),
                        (t, 3): InputTime(None),
                        (t, 4): InputTime(500),
                    }
                )
                tx.write_correlations([(_record(record, open_part=True), 7)], [])

        build("abandoned")
        assert times(client, redis_prefix, "school#rebuild")
        swap.abandon()
        assert sorted(client.scan_iter(match=f"{redis_prefix}:s:school#rebuild:*")) == []
        assert sorted(client.scan_iter(match=f"{redis_prefix}:s:school:2:*")) == []

        build("rebuilt")
        client.hset(f"{redis_prefix}:s:school:times", "cdc.t:1", "damaged")
        with pytest.raises(RedisStateCorrupt, match=r"cdc\.t:1"):
            swap.swap(lambda targets: None, 5.0, tps)
        assert client.get(f"{redis_prefix}:s:school:version") == "1"  # nothing written
        assert client.hget(f"{redis_prefix}:s:school:times", "cdc.t:0") == "1000,1"
        client.hset(f"{redis_prefix}:s:school:times", "cdc.t:1", "3000,0")
        carried = swap.swap(lambda targets: None, 5.0, tps)
        assert swap.drop_old(5.0)
        assert carried == {(t, 0): 10, (t, 1): 5, (t, 2): 3, (t, 3): 4, (t, 4): 2}
        assert times(client, redis_prefix) == {
            "cdc.t:0": "2000,1",
            "cdc.t:1": "3000,0",
            "cdc.t:2": "100,0",
            "cdc.t:3": "700,1",
            "cdc.t:4": "500,1",
        }
        with store.batch("school", "school") as tx:
            assert set(tx.lock_correlations(["live", "rebuilt"], 10)) == {"rebuilt"}
        base = f"{redis_prefix}:s:school:2"
        assert client.zrange(f"{base}:codue", 0, -1) == ["rebuilt"]
        assert client.smembers(f"{base}:coopen") == {"rebuilt"}
        assert json.loads(client.get(f"{base}:co:rebuilt") or "null")["key"] == "rebuilt"
        assert leftovers(client, redis_prefix) == []
    finally:
        store.close()


def test_status_and_inspect_show_a_redis_projections_correlations(
    backend: RedisBackend, topics: dict[str, str], tmp_path: Path
) -> None:
    """Proves ``projector status`` and ``projector inspect`` read a Redis projection's
    correlation as they read PostgreSQL's: with one enrolment complete and another missing its
    STUDENT_COURSE part, ``status --json`` shows one open correlation and an outbox with
    nothing left to publish (the burst run's publisher drained it); ``inspect`` shows the open
    key's parts and END record, and the closed one's window with its business id."""
    log = school_log(random.Random(35), changes=40)
    done, waiting, _ = _three_enrolments(log)
    proj = backend.projection(topics, HANDLERS, outbox={"topic": topics["outbox"]}, window="1h")
    path = backend.process_config(tmp_path, proj)
    send(backend.services, [*messages_of(topics, [done]), *enrolment_parts(topics, waiting, False)])
    run_burst(backend.make(proj), Clock(tx_ms(done) / 1000))
    [(closed_id, _)] = expected_business([done])

    runner = CliRunner()
    status = runner.invoke(app, ["status", "-c", str(path), "--json", "--sample", "0"])
    assert status.exit_code == 0, status.output
    [item] = json.loads(status.stdout)
    figures = item["correlation"]
    assert (figures["open_correlations"], figures["outbox_pending"]) == (1, 0), figures
    assert figures["watermark_lag_s"] is not None

    def inspect(key: int) -> dict[str, Any]:
        result = runner.invoke(
            app, ["inspect", "school", f"school:{key}", "-c", str(path), "--json"]
        )
        assert result.exit_code == 0, result.output
        record: dict[str, Any] = json.loads(result.stdout)["correlation"]
        return record

    opened = inspect(waiting.tx_id)
    assert sorted(opened["open_parts"]) == ["course", "student"]
    assert opened["end"] is not None and opened["due"] is not None
    closed = inspect(done.tx_id)
    assert closed["open_parts"] == {}
    assert [(w["business_id"], w["events"]) for w in closed["closed"]] == [(closed_id, 4)]
