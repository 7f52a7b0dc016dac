"""The gap timer's schedule on Redis lives beside the stream hashes (``gapsched``), set by
compare-and-set: what the batches that rewrite a stream's gaps keep of it, what two gap timers
deciding one gap at once get, and what is left once a gap fills or goes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, cast

import pytest
import redis

from projector.core.gaps import Gap
from projector.store.redis import RedisStore
from tests.conftest import Services
from tests.integration.test_redis_store import TOPIC, applier_for, wire

pytestmark = pytest.mark.integration

TP = (TOPIC, 0)
NOW = 4_000_000_000.0  # far past every gap's first request time (gap_timeout 30 s)


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


@pytest.fixture
def store(make_store: Callable[[], RedisStore]) -> RedisStore:
    return make_store()


@pytest.fixture
def apply(services: Services, pg_dsn: str, store: RedisStore) -> Callable[[list[Any]], Any]:
    """The counting projection on one partition, claimed; batches applied one at a time."""
    applier = applier_for(services, pg_dsn, store)
    epochs = {TP: store.claim("p", [TP], "a")[TP].epoch}
    return lambda messages: applier(messages, epochs)


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
    apply: Callable[[list[Any]], Any],
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves a gap that shrinks or splits keeps the schedule the gap timer set on it (attempt,
    next request, held), copied by the batch script from where it stands, so the request it
    made is not made again at once for the pieces; and that once filled, no index entry or
    schedule of it is left behind."""
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
    apply: Callable[[list[Any]], Any],
    make_store: Callable[[], RedisStore],
    store: RedisStore,
) -> None:
    """Proves the compare-and-set: a second instance's gap timer claims the gap between this
    one's read and its write; this one's write is refused and it does not request the gap, so
    the gap gets one request for its first attempt, not two."""
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
    apply: Callable[[list[Any]], Any],
    store: RedisStore,
    client: redis.Redis,
    redis_prefix: str,
) -> None:
    """Proves the gap timer finding a due entry whose gap is gone (filled between its read of
    the due index and its write) requests nothing and removes the entry and its schedule, so
    it does not come due again."""
    apply([wire("s1", 1, 0)])
    base = f"{redis_prefix}:s:p:1"
    client.zadd(f"{base}:gapdue", {'["s1",2]': 1.0})
    client.hset(f"{base}:gapsched", '["s1",2]', '[1,1.0,1.0,"open"]')

    assert store.claim_due_gaps("p", NOW, 10, ask()) == []
    assert indexes(client, redis_prefix) == {"gaps": [], "due": [], "held": [], "schedules": []}
