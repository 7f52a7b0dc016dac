"""Correlation on the Redis store (issue 12, docs/correlation.md slice 4) against real Kafka and
Redis.

The contract tests of :mod:`tests.integration.test_correlation` run here unchanged, through a
Redis :class:`RedisBackend` (the ``backend`` fixture below overrides PostgreSQL's): the three
parts in all six orders, windows outside the window, a lone part closed by the idle watermark
with the injected clock, kill -9 and a crash point while a window is open, two instances, dead
letters and their retry, and the shuffled, re-delivered school log. The documents go to
``handlers.profiles_redis``, the business events to ``tests.integration.business_log_redis``
and ``handlers.school_history_redis``.

Below them, what only Redis has: the WATCH on the correlation records (a record another
instance wrote after this batch read it makes the commit fail and the batch is planned again),
the batch script's type checks before it writes anything, and the idle tick's ``hold``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from projector.core.correlate import ClosedWindow, InputTime, Pending
from projector.store.base import Store
from projector.store.errors import Fenced, WriteConflict
from projector.store.redis import RedisStateCorrupt, RedisStore
from tests.conftest import Services
from tests.integration.test_correlation import (
    Backend,
    LogRow,
    projection,
    test_a_lone_part_closes_by_the_idle_watermark,
    test_a_shuffled_and_redelivered_school_log_names_the_rules_events_once,
    test_kill_9_while_a_window_is_open_then_restart_closes_it_once,
    test_parts_outside_the_window_make_partial_events,
    test_rule_and_business_handler_failures_are_dead_letters_and_retry,
    test_three_parts_in_all_six_orders_make_one_enroll_each,
    test_two_instances_close_every_transaction_once,
    topics,
)

pytestmark = pytest.mark.integration

__all__ = [  # the contract tests, collected here with the Redis backend
    "test_a_lone_part_closes_by_the_idle_watermark",
    "test_a_shuffled_and_redelivered_school_log_names_the_rules_events_once",
    "test_kill_9_while_a_window_is_open_then_restart_closes_it_once",
    "test_parts_outside_the_window_make_partial_events",
    "test_rule_and_business_handler_failures_are_dead_letters_and_retry",
    "test_three_parts_in_all_six_orders_make_one_enroll_each",
    "test_two_instances_close_every_transaction_once",
    "topics",
]

PROJECTION = "school"


class RedisBackend(Backend):
    """The school projection in Redis, read back by restating the documented layout
    (docs/redis.md), not by calling the store."""

    kind = "redis"

    def __init__(self, services: Services, pg_dsn: str, prefix: str) -> None:
        super().__init__(services, pg_dsn)
        self.prefix = prefix

    def projection(
        self, topic_of: dict[str, str], handlers: Sequence[str], **correlation: Any
    ) -> dict[str, Any]:
        """The same projection with ``store: redis``: documents kept by
        ``handlers.profiles_redis``, each other handler in its ``_redis`` flavour."""
        proj = projection(topic_of, [f"{h}_redis" for h in handlers], **correlation)
        proj["handlers"][0] = "handlers.profiles_redis"
        return {**proj, "store": "redis"}

    def config_dict(self, proj: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().config_dict(proj),
            "redis": {"url": self.services.redis_url, "prefix": self.prefix},
        }

    def store(self) -> Store:
        return RedisStore(self.services.redis_url, self.prefix)

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.services.redis_url, decode_responses=True)

    def _fence(self) -> str:
        return f"{self.prefix}:s:{PROJECTION}"

    def _base(self, r: redis.Redis) -> str:
        version = str(r.get(f"{self._fence()}:version") or "1")
        return f"{self._fence()}:{version}"

    def _views(self, r: redis.Redis) -> str:
        active = str(r.get(f"{self.prefix}:v:{PROJECTION}:active") or "1")
        return f"{self.prefix}:v:{PROJECTION}:{active}"

    def business_log(self) -> list[LogRow]:
        """Both hashes as of one moment (MULTI/EXEC): daemons may be writing meanwhile."""
        with self._client() as r, r.pipeline(transaction=True) as pipe:
            ns = self._views(r)
            pipe.hgetall(f"{ns}:business_log:applied")
            pipe.hgetall(f"{ns}:business_log:event")
            applied, stored = pipe.execute()
        assert set(applied) == set(stored)
        out: list[LogRow] = []
        for business_id, times in sorted(applied.items()):
            e = json.loads(stored[business_id])
            out += [(business_id, e["type"], e["stream"], e["data"])] * int(times)
        return out

    def history(self) -> list[tuple[str, str]]:
        with self._client() as r:
            ns = self._views(r)
            ids = r.zrange(f"{ns}:history", 0, -1)
            return sorted((i, str(r.hget(f"{ns}:history:{i}", "type"))) for i in ids)

    def open_parts(self) -> int:
        """Records with open parts, counted from the records themselves; the ``coopen`` set
        the metrics read must agree. The records and the set are WATCHed while read, so a
        daemon writing meanwhile makes the read start again."""
        with self._client() as r:
            while True:
                with r.pipeline(transaction=True) as pipe:
                    try:
                        count, listed = self._open_parts(r, pipe)
                    except redis.exceptions.WatchError:
                        continue
                assert listed == count, "coopen disagrees with the records"
                return count

    def _open_parts(self, r: redis.Redis, pipe: Any) -> tuple[int, int]:
        base = self._base(r)
        keys = list(r.scan_iter(match=f"{base}:co:*", count=1000))
        pipe.watch(f"{base}:coopen", *keys)  # from here on, pipe's commands run at once
        records = [pipe.get(k) for k in keys]
        pipe.multi()
        pipe.scard(f"{base}:coopen")
        [listed] = pipe.execute()
        return sum(1 for raw in records if raw and json.loads(raw)["parts"]), int(listed)

    def consumed(self) -> int:
        with self._client() as r:
            return sum(int(v) for v in r.hvals(f"{self._fence()}:offsets"))

    def owners(self, writing: bool = False) -> int:
        with self._client() as r, r.pipeline(transaction=True) as pipe:
            pipe.hgetall(f"{self._fence()}:owners")
            pipe.hgetall(f"{self._fence()}:offsets")
            owners, offsets = pipe.execute()
        return len({o for tp, o in owners.items() if not writing or int(offsets.get(tp, 0)) > 0})

    def dead_letters(self) -> list[tuple[int, str, str | None, str]]:
        with self._client() as r:
            letters = r.hgetall(f"{self._base(r)}:dl")
        out = []
        for letter_id, raw in sorted(letters.items(), key=lambda kv: int(kv[0])):
            d = json.loads(raw)
            event_type = None if d["event"] is None else d["event"]["type"]
            out.append((int(letter_id), d["kind"], event_type, d["status"]))
        return out


@pytest.fixture
def backend(services: Services, pg_dsn: str, redis_prefix: str) -> Backend:
    return RedisBackend(services, pg_dsn, redis_prefix)


# -- what only Redis has ------------------------------------------------------------------


@pytest.fixture
def stores(services: Services, redis_prefix: str) -> Iterator[Callable[[], RedisStore]]:
    """Store connections of the test's own (two instances, in-process), closed afterwards."""
    made: list[RedisStore] = []

    def make() -> RedisStore:
        made.append(RedisStore(services.redis_url, redis_prefix))
        return made[-1]

    yield make
    for s in made:
        s.close()


def record(key: str, until: int) -> Pending:
    """A record whose only window closed at ``until`` (no open parts)."""
    return Pending(
        key, closed=(ClosedWindow(until, frozenset({f"{key}/1"}), None),), closed_until=until
    )


def test_a_record_written_after_this_batch_read_it_fails_the_commit_and_is_read_again(
    stores: Callable[[], RedisStore],
) -> None:
    """Proves the WATCH on correlation records (docs/correlation.md section 6): two instances
    find the record of key ``k`` due at the same watermark; the second closes it and commits
    first, so the first one's commit fails (a transient error: the batch is planned again,
    nothing of it written), and planned again from fresh reads it finds ``k`` no longer due.
    Likewise a record created by another instance after this batch found none."""
    a, b = stores(), stores()
    with a.batch(PROJECTION, PROJECTION) as tx:
        tx.write_correlations([(record("k", 100), 150)], [])
    with pytest.raises(WriteConflict), a.batch(PROJECTION, PROJECTION) as first:
        assert set(first.lock_correlations([], 200)) == {"k"}
        with b.batch(PROJECTION, PROJECTION) as second:
            assert set(second.lock_correlations([], 200)) == {"k"}
            second.write_correlations([(record("k", 100), None)], [])
        first.write_correlations([(record("k", 999), None)], [])
    with a.batch(PROJECTION, PROJECTION) as again:
        assert again.lock_correlations([], 200) == {}
        assert again.lock_correlations(["k"], 200) == {"k": record("k", 100)}

    with pytest.raises(WriteConflict), a.batch(PROJECTION, PROJECTION) as first:
        assert first.lock_correlations(["new"], None) == {}
        with b.batch(PROJECTION, PROJECTION) as second:
            second.lock_correlations(["new"], None)
            second.write_correlations([(record("new", 5), 10)], [])
        first.write_correlations([(record("new", 7), 12)], [])
    with a.batch(PROJECTION, PROJECTION) as again:
        assert again.lock_correlations([], 10) == {"new": record("new", 5)}


def test_the_batch_checks_the_correlation_keys_types_before_writing_anything(
    stores: Callable[[], RedisStore], services: Services, redis_prefix: str
) -> None:
    """Proves the batch script checks the type of the correlation keys before it writes:
    a correlation record key holding a hash, or a ``times`` key holding a string (written
    by something other than projector), stops the batch as damaged state, with nothing of it
    written: not its checkpoint, not its view write, not its other records."""
    store = stores()
    tp = ("t", 0)
    epoch = store.claim(PROJECTION, [tp], "me")[tp].epoch
    keys = store.keys(PROJECTION)
    client = redis.Redis.from_url(services.redis_url, decode_responses=True)
    try:
        client.hset(keys.correlation("bad"), "x", "1")
        with pytest.raises(RedisStateCorrupt), store.batch(PROJECTION, PROJECTION) as tx:
            tx.fence({tp: 5}, {tp: epoch})
            tx.write_correlations([(record("good", 1), 2), (record("bad", 1), 2)], [])
            tx.run_handlers([lambda _, view: view.set("seen", 1)], [None])
        assert client.hget(keys.offsets, "t:0") is None
        assert (
            client.exists(keys.correlation("good"), keys.codue, f"{redis_prefix}:v:school:1:seen")
            == 0
        )

        client.delete(keys.correlation("bad"))
        client.set(keys.times, "not a hash")
        with pytest.raises(RedisStateCorrupt), store.batch(PROJECTION, PROJECTION) as tx:
            tx.fence({tp: 5}, {tp: epoch})
            tx.write_correlations([(record("good", 1), 2)], [])
            tx.write_input_times({tp: InputTime(10)})
        assert client.hget(keys.offsets, "t:0") is None
        assert client.exists(keys.correlation("good"), keys.codue) == 0
    finally:
        client.close()


def test_hold_fences_without_moving_the_checkpoint_and_input_times_never_go_back(
    stores: Callable[[], RedisStore], services: Services
) -> None:
    """Proves the idle tick's ``hold`` on Redis: on the current epoch it commits the batch's
    correlation writes and moves no checkpoint (a partition never read keeps no offset, so a
    restart does not seek to 0); on a lost epoch it raises ``Fenced`` and writes nothing. And
    a partition's stored high never goes back (a clock set back), while ``caught_up`` follows
    the last write; a claimed partition with no progress yet reads as unset."""
    store = stores()
    read, never = ("t", 0), ("t", 1)
    claims = store.claim(PROJECTION, [read, never], "me")
    epochs = {tp: c.epoch for tp, c in claims.items()}
    with store.batch(PROJECTION, PROJECTION) as tx:
        tx.fence({read: 5}, epochs)
        tx.write_input_times({read: InputTime(1_000)})
    with store.batch(PROJECTION, PROJECTION) as tx:
        tx.hold(epochs)
        tx.write_input_times({read: InputTime(500, caught_up=True)})
        tx.write_correlations([(record("k", 1), 2)], [])
    assert store.checkpoints(PROJECTION) == {read: 5, never: None}
    with store.batch(PROJECTION, PROJECTION) as tx:
        assert tx.input_times(["t", "other"]) == {
            read: InputTime(1_000, caught_up=True),
            never: InputTime(None),
        }
        assert set(tx.lock_correlations([], 2)) == {"k"}
    assert store.correlation_figures(PROJECTION, ["t"]) == (0, None)

    stale = {tp: e - 1 for tp, e in epochs.items()}
    with pytest.raises(Fenced), store.batch(PROJECTION, PROJECTION) as tx:
        tx.hold(stale)
        tx.write_input_times({read: InputTime(9_000)})
        tx.write_correlations([(record("gone", 1), 2)], [])
    with store.batch(PROJECTION, PROJECTION) as tx:
        assert tx.input_times(["t"])[read] == InputTime(1_000, caught_up=True)
        assert tx.lock_correlations(["gone"], None) == {}
