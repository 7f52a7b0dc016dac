"""The Redis flavours of the example handlers (``handlers.customers_redis``,
``handlers.game_redis``) against the oracles in ``projector.scenarios``, without Redis.

A ``RedisView`` is built over ``FakeRedis``: a dict-backed reader for the view's reads and a
tiny executor that applies the ops a batch recorded, so batches run one after another with the
state carried between them as the store would. What is checked is the handlers' mapping (reads,
key layout, writes, batch boundaries); the real store path (Lua script, fence, WATCH) is the
integration tests' business. The views are read back here by ``customers_in_redis`` and
``games_in_redis``, which restate the documented layout rather than call the handlers' own
converters, so a mistake in one is not silently shared by the other.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers import customers_redis, game_redis
from projector.core.event import Event
from projector.scenarios import as_events, customer_log, customers_oracle, game_log, game_oracle
from projector.store.redis_view import Op, RedisView

NS = "ns"
Row = dict[str, Any]
Handle = Callable[[Sequence[Event], RedisView], None]


class FakeRedis:
    """The few Redis types and commands the handlers use, in dicts. Like Redis, a key holds
    one type (another type's command on it is an error) and an emptied collection is gone."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.reads: list[tuple[str, list[str]]] = []

    def keys(self) -> set[str]:
        return set(self.hashes) | set(self.sets) | set(self.zsets)

    # -- the reader a RedisView is given --------------------------------------------------
    def read(self, op: str, keys: Sequence[str], args: Sequence[str]) -> list[Any]:
        self.reads.append((op, list(keys)))
        return [self._read(op, key, args) for key in keys]

    def _read(self, op: str, key: str, args: Sequence[str]) -> Any:
        if op == "get":
            return None  # no handler here stores strings
        if op == "hget":
            return self.hashes.get(key, {}).get(args[0])
        if op == "hgetall":
            return [part for pair in self.hashes.get(key, {}).items() for part in pair]
        if op == "smembers":
            return sorted(self.sets.get(key, ()))
        if op == "zscore":
            score = self.zsets.get(key, {}).get(args[0])
            return None if score is None else repr(score)
        if op == "exists":
            return int(key in self.keys())
        raise AssertionError(f"unknown read {op}")

    # -- the executor of a batch's ops ----------------------------------------------------
    def execute(self, ops: Iterable[Op]) -> None:
        for command, key, *args in ops:
            assert key.startswith(f"{NS}:"), key
            getattr(self, f"_{command.lower()}")(key, args)
            self._drop_if_empty(key)

    def _del(self, key: str, args: list[str]) -> None:
        for store in (self.hashes, self.sets, self.zsets):
            store.pop(key, None)

    def _hset(self, key: str, args: list[str]) -> None:
        self._of(self.hashes, key, dict).update(zip(args[::2], args[1::2], strict=True))

    def _hdel(self, key: str, args: list[str]) -> None:
        for field in args:
            self._of(self.hashes, key, dict).pop(field, None)

    def _sadd(self, key: str, args: list[str]) -> None:
        self._of(self.sets, key, set).update(args)

    def _srem(self, key: str, args: list[str]) -> None:
        self._of(self.sets, key, set).difference_update(args)

    def _zadd(self, key: str, args: list[str]) -> None:
        members = self._of(self.zsets, key, dict)
        for score, member in zip(args[::2], args[1::2], strict=True):
            members[member] = float(score)

    def _zrem(self, key: str, args: list[str]) -> None:
        for member in args:
            self._of(self.zsets, key, dict).pop(member, None)

    def _of(self, store: dict[str, Any], key: str, new: Callable[[], Any]) -> Any:
        others = [s for s in (self.hashes, self.sets, self.zsets) if s is not store]
        assert not any(key in s for s in others), f"WRONGTYPE {key}"
        return store.setdefault(key, new())

    def _drop_if_empty(self, key: str) -> None:
        for store in (self.hashes, self.sets, self.zsets):
            if key in store and not store[key]:
                del store[key]


def apply_batch(redis: FakeRedis, handle: Handle, batch: Sequence[Event]) -> list[Op]:
    """Plan ``batch`` with ``handle`` over what ``redis`` holds, then apply the plan."""
    ops: list[Op] = []
    handle(batch, RedisView(namespace=NS, ops=ops, reader=redis.read))
    redis.execute(ops)
    return ops


def cut(events: Sequence[Event], sizes: Sequence[int]) -> list[Sequence[Event]]:
    """``events`` in consecutive batches whose sizes cycle through ``sizes``."""
    out: list[Sequence[Event]] = []
    i = 0
    while i < len(events):
        size = sizes[len(out) % len(sizes)]
        out.append(events[i : i + size])
        i += size
    return out


def wire(stream: str, seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"stream": stream, "seq": seq, "type": kind, "ts": seq, "data": data}


def hset_once(ops: Sequence[Op]) -> bool:
    return all(n == 1 for n in Counter(op[1] for op in ops if op[0] == "HSET").values())


SIZES = st.lists(st.integers(1, 80), min_size=1, max_size=8)


# ------------------------------------------------------------------------------ customers


def customers_in_redis(redis: FakeRedis) -> dict[str, Row]:
    """The customer list as a reader sees it, checked for consistency: every ``customer:<id>``
    hash is in the ``customers`` set and in ``customers:by_name``, and nothing else is stored."""
    ids = redis.sets.get(f"{NS}:customers", set())
    rows: dict[str, Row] = {}
    for cid in ids:
        h = redis.hashes[f"{NS}:customer:{cid}"]
        assert set(h) <= {"name", "email", "version", "applied_events"}
        rows[cid] = {
            "id": cid,
            "name": h["name"],
            "email": h.get("email"),
            "version": int(h["version"]),
            "applied_events": int(h["applied_events"]),
        }
    by_name = {f"{r['name']}\x00{cid}": 0.0 for cid, r in rows.items()}
    assert redis.zsets.get(f"{NS}:customers:by_name", {}) == by_name
    expected_keys = {f"{NS}:customer:{cid}" for cid in ids}
    if ids:
        expected_keys |= {f"{NS}:customers", f"{NS}:customers:by_name"}
    assert redis.keys() == expected_keys
    return rows


@given(seed=st.integers(0, 2**32 - 1), sizes=SIZES)
def test_customers_match_the_oracle_whatever_the_batching(seed: int, sizes: list[int]) -> None:
    """Proves the Redis customer list equals the oracle's rows, set and name index included,
    however the interleaved log is cut into batches; and that each batch reads once and writes
    each customer's hash at most once."""
    log = customer_log(random.Random(seed), 40)
    redis = FakeRedis()
    for batch in cut(as_events(log), sizes):
        reads = len(redis.reads)
        ops = apply_batch(redis, customers_redis.handle, batch)
        assert [op for op, _ in redis.reads[reads:]] == ["hgetall"]
        assert hset_once(ops)
    assert customers_in_redis(redis) == customers_oracle(log)


def test_customer_deleted_and_recreated_across_batches() -> None:
    """Proves create/rename then delete/re-create (without email)/rename in the next batch
    leave one fresh hash with no stale email, the new name alone in the index, and the
    fold's version and count."""
    log = [
        wire("customer:1", 1, "CUSTOMER_CREATED", {"id": "1", "name": "Ada", "email": "a@x"}),
        wire("customer:1", 2, "CUSTOMER_RENAMED", {"id": "1", "name": "Ada Okafor"}),
        wire("customer:1", 3, "CUSTOMER_DELETED", {"id": "1"}),
        wire("customer:1", 4, "CUSTOMER_CREATED", {"id": "1", "name": "Bram", "email": None}),
        wire("customer:1", 5, "CUSTOMER_RENAMED", {"id": "1", "name": "Bram Novak"}),
    ]
    events = as_events(log)
    redis = FakeRedis()
    apply_batch(redis, customers_redis.handle, events[:2])
    assert redis.hashes[f"{NS}:customer:1"]["email"] == "a@x"
    apply_batch(redis, customers_redis.handle, events[2:])
    row = {"id": "1", "name": "Bram Novak", "email": None, "version": 5, "applied_events": 2}
    assert customers_in_redis(redis) == {"1": row} == customers_oracle(log)
    assert "email" not in redis.hashes[f"{NS}:customer:1"]


def test_customer_deleted_in_a_later_batch_leaves_no_key() -> None:
    """Proves a delete removes the hash, the set member and the index member, and that a
    customer created and deleted within one batch is never written at all."""
    events = as_events(
        [
            wire("customer:1", 1, "CUSTOMER_CREATED", {"id": "1", "name": "Ada"}),
            wire("customer:2", 1, "CUSTOMER_CREATED", {"id": "2", "name": "Chen"}),
            wire("customer:2", 2, "CUSTOMER_DELETED", {"id": "2"}),
            wire("customer:1", 2, "CUSTOMER_DELETED", {"id": "1"}),
        ]
    )
    redis = FakeRedis()
    first = apply_batch(redis, customers_redis.handle, events[:1])
    assert [op[0] for op in first] == ["HSET", "SADD", "ZADD"]
    second = apply_batch(redis, customers_redis.handle, events[1:])
    assert all(op[1] != f"{NS}:customer:2" for op in second)
    assert redis.keys() == set()


def test_customer_rename_moves_its_index_member() -> None:
    """Proves a rename in a later batch removes the old ``<name>\\x00<id>`` member (found from
    the stored name, since reads do not see the batch) and that the index sorts by name."""
    events = as_events(
        [
            wire("customer:1", 1, "CUSTOMER_CREATED", {"id": "1", "name": "Ada Okafor"}),
            wire("customer:2", 1, "CUSTOMER_CREATED", {"id": "2", "name": "Ada"}),
            wire("customer:1", 2, "CUSTOMER_RENAMED", {"id": "1", "name": "Zoe"}),
        ]
    )
    redis = FakeRedis()
    apply_batch(redis, customers_redis.handle, events[:2])
    assert sorted(redis.zsets[f"{NS}:customers:by_name"]) == ["Ada\x002", "Ada Okafor\x001"]
    apply_batch(redis, customers_redis.handle, events[2:])
    assert sorted(redis.zsets[f"{NS}:customers:by_name"]) == ["Ada\x002", "Zoe\x001"]


# ------------------------------------------------------------------------------ games

GAME_KEY = re.compile(rf"^{NS}:game:([^:]+)$")
PLAYER_KEY = re.compile(rf"^{NS}:game:([^:]+):player:(\d+)$")


def games_in_redis(
    redis: FakeRedis,
) -> tuple[dict[str, Row], dict[tuple[str, int], Row]]:
    """The ``games`` and ``player_stats`` rows as a reader sees them in Redis, checked for
    consistency: per game, the players set, the leaderboard (score = points) and the player
    hashes name the same players, and nothing else is stored."""
    games: dict[str, Row] = {}
    players: dict[tuple[str, int], Row] = {}
    for key, h in redis.hashes.items():
        if m := GAME_KEY.match(key):
            games[m[1]] = _game_row(m[1], h)
        elif m := PLAYER_KEY.match(key):
            players[(m[1], int(m[2]))] = _player_row(m[1], int(m[2]), h)
        else:
            raise AssertionError(f"stray hash {key}")
    expected_keys = set(redis.hashes)
    for gid in games:
        box = {n: row["points"] for (g, n), row in players.items() if g == gid}
        if box:
            assert redis.sets[f"{NS}:game:{gid}:players"] == {str(n) for n in box}
            leaderboard = {str(n): float(points) for n, points in box.items()}
            assert redis.zsets[f"{NS}:game:{gid}:leaderboard"] == leaderboard
            expected_keys |= {f"{NS}:game:{gid}:players", f"{NS}:game:{gid}:leaderboard"}
    assert redis.keys() == expected_keys
    return games, players


def _game_row(gid: str, h: dict[str, str]) -> Row:
    assist = h.get("pending_assist")
    return {
        "id": gid,
        "home": h["home"],
        "away": h["away"],
        "status": h["status"],
        "home_points": int(h["home_points"]),
        "away_points": int(h["away_points"]),
        "pending_assist": None if assist is None else json.loads(assist),
        "plays": int(h["plays"]),
        "last_seq": int(h["last_seq"]),
    }


def _player_row(gid: str, player: int, h: dict[str, str]) -> Row:
    return {
        "game_id": gid,
        "player": player,
        "team": h["team"],
        "points": int(h["points"]),
        "assists": int(h["assists"]),
        "jumps": int(h["jumps"]),
    }


@given(seed=st.integers(0, 2**32 - 1), sizes=SIZES)
def test_games_match_the_oracle_whatever_the_batching(seed: int, sizes: list[int]) -> None:
    """Proves the Redis box scores and leaderboards equal the oracle's, however the log of
    interleaved games is cut into batches (an ASSIST and its POINT often fall on both sides of
    a cut); that a batch makes at most two reads, the second only to fetch the passer of a
    stored pending assist; and that each hash is written at most once per batch."""
    log = game_log(random.Random(seed), 6, 40)
    redis = FakeRedis()
    for batch in cut(as_events(log), sizes):
        reads = len(redis.reads)
        ops = apply_batch(redis, game_redis.handle, batch)
        assert [op for op, _ in redis.reads[reads:]] in (["hgetall"], ["hgetall"] * 2)
        assert hset_once(ops)
    assert games_in_redis(redis) == game_oracle(log)


def assist_story() -> list[dict[str, Any]]:
    """Two games, interleaved, each with an ASSIST whose POINT comes two events later."""
    return [
        wire("game:1", 1, "START", {"home": "Bulls", "away": "Heat"}),
        wire("game:2", 1, "START", {"home": "Nets", "away": "Suns"}),
        wire("game:1", 2, "ASSIST", {"team": "Bulls", "player": 7}),
        wire("game:2", 2, "ASSIST", {"team": "Suns", "player": 3}),
        wire("game:1", 3, "POINT", {"team": "Bulls", "player": 23, "value": 3}),
        wire("game:2", 3, "POINT", {"team": "Suns", "player": 35, "value": 2}),
        wire("game:1", 4, "END", {}),
    ]


def test_game_assist_and_its_point_in_different_batches() -> None:
    """Proves a pending assist stored by one batch is credited by the POINT of the next, whose
    events never name the passer (a second read fetches its line), giving the box score and
    leaderboard of a single batch, with ``pending_assist`` removed from the game hash."""
    events = as_events(assist_story())
    whole = FakeRedis()
    apply_batch(whole, game_redis.handle, events)
    split = FakeRedis()
    apply_batch(split, game_redis.handle, events[:4])
    assert json.loads(split.hashes[f"{NS}:game:1"]["pending_assist"]) == {
        "team": "Bulls",
        "player": 7,
    }
    reads = len(split.reads)
    apply_batch(split, game_redis.handle, events[4:])
    second = split.reads[reads + 1][1]
    assert sorted(second) == [f"{NS}:game:1:player:7", f"{NS}:game:2:player:3"]
    assert games_in_redis(split) == games_in_redis(whole) == game_oracle(assist_story())
    assert "pending_assist" not in split.hashes[f"{NS}:game:1"]
    assert split.zsets[f"{NS}:game:1:leaderboard"] == {"7": 0.0, "23": 3.0}


def test_game_leaderboard_moves_only_changed_scores() -> None:
    """Proves a later batch re-scores only the players whose points changed, and adds a new
    player (a JUMP, no points) to the players set and leaderboard at 0."""
    events = as_events(
        [
            wire("game:1", 1, "START", {"home": "Bulls", "away": "Heat"}),
            wire("game:1", 2, "POINT", {"team": "Bulls", "player": 23, "value": 2}),
            wire("game:1", 3, "JUMP", {"team": "Bulls", "player": 23}),
            wire("game:1", 4, "JUMP", {"team": "Heat", "player": 5}),
        ]
    )
    redis = FakeRedis()
    apply_batch(redis, game_redis.handle, events[:2])
    ops = apply_batch(redis, game_redis.handle, events[2:])
    assert [op for op in ops if op[0] in ("SADD", "ZADD")] == [
        ["SADD", f"{NS}:game:1:players", "5"],
        ["ZADD", f"{NS}:game:1:leaderboard", "0", "5"],
    ]
    assert redis.zsets[f"{NS}:game:1:leaderboard"] == {"23": 2.0, "5": 0.0}
    assert redis.hashes[f"{NS}:game:1:player:23"]["jumps"] == "1"


def test_game_rule_violation_writes_nothing() -> None:
    """Proves a misordered batch (the seed's POINT before its ASSIST) raises the fold's
    ``ValueError`` before any write is recorded."""
    events = as_events(
        [
            wire("game:5", 1, "START", {"home": "Bulls", "away": "Heat"}),
            wire("game:5", 2, "POINT", {"team": "Bulls", "player": 23, "value": 2}),
            wire("game:5", 3, "ASSIST", {"team": "Bulls", "player": 7}),
            wire("game:5", 4, "JUMP", {"team": "Heat", "player": 5}),
        ]
    )
    ops: list[Op] = []
    view = RedisView(namespace=NS, ops=ops, reader=FakeRedis().read)
    with pytest.raises(ValueError, match="ASSIST must be immediately followed by a POINT"):
        game_redis.handle(events, view)
    assert ops == []


@pytest.mark.parametrize("player", ["7", 7.0, True, None])
def test_game_refuses_a_player_that_is_not_an_integer(player: object) -> None:
    """Proves a player number that is not an int (it names a key and must round-trip) is a
    ``ValueError`` naming the event, not a silently mis-keyed line."""
    events = as_events(
        [
            wire("game:1", 1, "START", {"home": "Bulls", "away": "Heat"}),
            wire("game:1", 2, "JUMP", {"team": "Bulls", "player": player}),
        ]
    )
    view = RedisView(namespace=NS, ops=[], reader=FakeRedis().read)
    with pytest.raises(ValueError, match="game:1 seq 2 JUMP: player must be an integer"):
        game_redis.handle(events, view)


# ------------------------------------------------------------------------------ both


@pytest.mark.parametrize("handle", [customers_redis.handle, game_redis.handle])
def test_handle_ignores_a_batch_without_its_types(handle: Handle) -> None:
    """Proves a batch of other event types costs no read and records no write."""
    redis = FakeRedis()
    ops = apply_batch(redis, handle, as_events([wire("other:1", 1, "SOMETHING", {})]))
    assert redis.reads == []
    assert ops == []
