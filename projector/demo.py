"""``make demo`` (``python -m projector.demo``): projector's promise, end to end, in one run.

Against the local services it creates a fresh database and fresh topics, deletes its Redis keys,
writes a config with five projections (accounts, customers, games, school, and games_redis: the
games' plays again, kept in Redis by ``handlers.game_redis``), checks and migrates it with the real
CLI, and publishes the seed scenarios of :mod:`projector.scenarios` shuffled and partly duplicated,
with one game's POINT published before its ASSIST as in the seed's basketball question. A few accounts
events are never published: they are only in the write side's event store (a table in the demo
database). The seed's CDC question goes to the merge projection ``school`` (``handlers.school``):
the Debezium change events of a school database's tables STUDENT, COURSE and STUDENT_COURSE
(:mod:`projector.cdc_scenario`), each on its own topic, shuffled in full with stale re-deliveries
and tombstones after deletes, and one student's unenrolment published before the enrolment;
with Debezium's transaction topic, a correlation names one business event per transaction
(``enroll``, ``change``, ``unenroll``, ``update``: ``handlers.school_correlation``), kept by
``handlers.school_history`` and published through the outbox to a topic it reads back.
Then it runs ``projector run --exit-when-caught-up``: the withheld events' gaps open, ``projector
gaps list`` shows them asked for, and the reference responder (``projector replay-responder``)
re-publishes them on the replay topic, which fills the gaps. It compares every row of every view
(and every key of the Redis views, read back by their documented layout) with the scenarios'
oracles (over the full log) and shows projector's own state. It exits non-zero if a view differs
from its oracle or events are left parked, missing, dead-lettered or unread. Every run starts from
scratch.

Environment: ``PROJECTOR_DEMO_KAFKA``, ``PROJECTOR_DEMO_PG_DSN`` and ``PROJECTOR_DEMO_REDIS_URL``
(default: the ``PROJECTOR_TEST_*`` settings of ``dev/services.sh env``, else the local services),
``PROJECTOR_DEMO_DB`` (the database it drops and creates, default ``projector_demo``) and
``PROJECTOR_DEMO_PREFIX`` (its topics, consumer groups and Redis keys, default ``demo``).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psycopg
import redis
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table
from rich.text import Text
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from handlers.school_correlation import name_business_events
from projector import cdc_scenario as cdc
from projector import scenarios
from projector.config import redact
from projector.core.merge import DocState, Kind, Mark
from projector.replay.responder import append_events, create_event_store
from projector.runner.outbox import HEADER_ID
from projector.scenarios import Row, Wire

ROOT = Path(__file__).resolve().parent.parent
SEED = 2025  # the same events, the same disorder, every run
PARTITIONS = 3
WINDOW = 50  # no message moves more than this many places in its topic
DUPLICATES = 0.05  # the fraction of messages published twice
BATCH = 100  # small batches, so early events also wait across transactions
SHOWN_ROWS = 5
STATE_SCHEMA = "projector"
WITHHELD = 3  # accounts events published nowhere but the event store: only replay brings them
GAP_TIMEOUT = 1.0  # seconds; short for the demo (the default is 30 s)
MAX_INTERVAL = 5.0  # seconds between repeated requests for a gap, at most
IDLE_SECONDS = 5.0  # the responder exits after this long without a request (> a group join)
EVENT_SCHEMA = "write_side"  # the write side's event_store table, in the demo database
EVENT_STORE = (EVENT_SCHEMA, "event_store")  # the responder's default table name

# No emoji codes: a Redis key such as "demo:v:games_redis:..." holds one (":v:").
console = Console(highlight=False, emoji=False)


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    kafka: str
    admin_dsn: str  # any database of the server; the demo's own is created beside it
    database: str
    prefix: str
    redis_url: str

    @property
    def redis_prefix(self) -> str:
        """``redis.prefix``: the demo's Redis keys are ``<prefix>:...``, deleted on every run."""
        return self.prefix

    @property
    def dsn(self) -> str:
        return make_conninfo(self.admin_dsn, dbname=self.database)

    @property
    def config_path(self) -> Path:
        return ROOT / ".dev" / "demo" / f"{self.prefix}.yaml"

    def topic(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def requests_topic(self) -> str:
        return self.topic("replay-requests")

    @property
    def responder_group(self) -> str:
        return f"{self.prefix}.replay-responder"


def settings_from(env: Mapping[str, str]) -> Settings:
    return Settings(
        kafka=env.get("PROJECTOR_DEMO_KAFKA")
        or env.get("PROJECTOR_TEST_KAFKA")
        or "127.0.0.1:19092",
        admin_dsn=env.get("PROJECTOR_DEMO_PG_DSN")
        or env.get("PROJECTOR_TEST_PG_DSN")
        or "postgresql://projector@127.0.0.1:15432/projector",
        database=env.get("PROJECTOR_DEMO_DB") or "projector_demo",
        prefix=env.get("PROJECTOR_DEMO_PREFIX") or "demo",
        redis_url=env.get("PROJECTOR_DEMO_REDIS_URL")
        or env.get("PROJECTOR_TEST_REDIS_URL")
        or "redis://127.0.0.1:16379/0",
    )


# ------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Projection:
    name: str  # also its view schema
    topic: str  # without the prefix
    handler: str
    log: list[Wire]  # the ordered log: what happened
    replay: bool = False  # withhold a few events; gaps are replayed from the event store

    @property
    def replay_topic(self) -> str:
        """Where the responder re-publishes this projection's events (without the prefix)."""
        return f"{self.topic}-replay"


@dataclass(frozen=True)
class View:
    table: str  # schema.table (in Redis: view_schema:key pattern)
    key: tuple[str, ...]
    expected: dict[Any, Row]  # the oracle's rows by key

    def key_of(self, row: Row) -> Any:
        return row[self.key[0]] if len(self.key) == 1 else tuple(row[k] for k in self.key)

    def only(self, keep: Callable[[Any], bool]) -> View:
        """This view restricted to the rows whose key ``keep`` accepts."""
        return View(self.table, self.key, {k: r for k, r in self.expected.items() if keep(k)})


def make_projections(rng: random.Random) -> list[Projection]:
    return [
        Projection(
            "accounts",
            "accounts",
            "handlers.accounts",
            scenarios.account_log(rng, 100, 10),
            replay=True,
        ),
        Projection("customers", "customers", "handlers.customers", scenarios.customer_log(rng, 50)),
        Projection("games", GAMES_TOPIC, "handlers.game", scenarios.game_log(rng, 6, 40)),
    ]


def make_views(logs: Mapping[str, list[Wire]]) -> dict[str, View]:
    games, players = scenarios.game_oracle(logs["games"])
    views = [
        View("accounts.accounts", ("id",), scenarios.accounts_oracle(logs["accounts"])),
        View("customers.customers", ("id",), scenarios.customers_oracle(logs["customers"])),
        View("games.games", ("id",), games),
        View("games.player_stats", ("game_id", "player"), players),
    ]
    return {v.table: v for v in views}


# ------------------------------------------------------------------------------ the seed's game


@dataclass(frozen=True)
class SeedCase:
    """An ASSIST, its POINT and the play after them, consecutive in one game."""

    assist: Wire
    point: Wire
    after: Wire

    @property
    def game_id(self) -> str:
        return str(self.assist["stream"]).removeprefix("game:")

    def as_played(self) -> list[Wire]:
        return [self.assist, self.point, self.after]

    def as_published(self) -> list[Wire]:
        """The seed's disorder: "Assist -> Point -> Jump" arrives as "Point -> Assist -> Jump"."""
        return [self.point, self.assist, self.after]


def find_seed_case(log: Sequence[Wire]) -> SeedCase:
    """The first ASSIST -> POINT -> JUMP of a game, else the first ASSIST -> POINT -> play."""
    streams: dict[str, list[Wire]] = {}
    for event in log:
        streams.setdefault(event["stream"], []).append(event)
    cases = [
        SeedCase(*events[i : i + 3])
        for events in streams.values()
        for i in range(len(events) - 2)
        if (events[i]["type"], events[i + 1]["type"]) == ("ASSIST", "POINT")
    ]
    return next((c for c in cases if c.after["type"] == "JUMP"), cases[0])


def _key(event: Wire) -> tuple[str, int]:
    return event["stream"], event["seq"]


def with_seed_disorder(messages: list[Wire], case: SeedCase) -> list[Wire]:
    """``messages`` with the case's three plays moved together, in the seed's wrong order."""
    keys = {_key(e) for e in case.as_published()}
    first = min(i for i, e in enumerate(messages) if _key(e) in keys)
    rest = [e for e in messages if _key(e) not in keys]
    return rest[:first] + case.as_published() + rest[first:]


def _plays(events: Iterable[Wire]) -> str:
    def play(e: Wire) -> str:
        value = f" +{e['data']['value']}" if "value" in e["data"] else ""
        return f"{e['type']}{value} by #{e['data']['player']} (seq {e['seq']})"

    return "  →  ".join(play(e) for e in events)


# ------------------------------------------------------------------------------ the games in Redis

GAMES_TOPIC = "game-plays"  # the games' plays (without the prefix), read by two projections
GAMES_REDIS = "games_redis"  # the second: the same box score in Redis; also its view schema
GAMES_REDIS_HANDLER = "handlers.game_redis"
PODIUM = 3  # the leaderboard's top players shown
# handlers.game_redis's keys (after "<prefix>:v:games_redis:"): their pattern and Redis type.
REDIS_TYPES = {
    "game:<id>": "hash",
    "game:<id>:player:<n>": "hash",
    "game:<id>:players": "set",
    "game:<id>:leaderboard": "zset",
}
_NUMBERS = frozenset(
    ("home_points", "away_points", "plays", "last_seq", "points", "assists", "jumps")
)


def make_redis_views(log: Sequence[Wire]) -> dict[str, View]:
    """The oracle of each of handlers.game_redis's key patterns, as rows: the box score of
    games.games and games.player_stats, in the layout the handler documents."""
    games, players = scenarios.game_oracle(log)
    members = {k: {"game_id": k[0], "player": k[1]} for k in players}
    points = {k: {**members[k], "points": row["points"]} for k, row in players.items()}
    views = [
        View(f"{GAMES_REDIS}:game:<id>", ("id",), games),
        View(f"{GAMES_REDIS}:game:<id>:player:<n>", ("game_id", "player"), players),
        View(f"{GAMES_REDIS}:game:<id>:players", ("game_id", "player"), members),
        View(f"{GAMES_REDIS}:game:<id>:leaderboard", ("game_id", "player"), points),
    ]
    return {v.table.removeprefix(f"{GAMES_REDIS}:"): v for v in views}


def redis_client(s: Settings) -> redis.Redis:
    return redis.Redis.from_url(s.redis_url, decode_responses=True)


def redis_views(s: Settings) -> str:
    """What every key of games_redis's views starts with, at the active version (as a reader
    finds it: ``<prefix>:v:<view_schema>:active``); the handler's key follows."""
    with redis_client(s) as client:
        active = client.get(f"{s.redis_prefix}:v:{GAMES_REDIS}:active") or "1"
    return f"{s.redis_prefix}:v:{GAMES_REDIS}:{active}:"


def _pattern(key: str) -> tuple[str, str, str | None] | None:
    """The pattern, game id and player of one of handlers.game_redis's keys (without the
    views' prefix); None for a key of no pattern."""
    match key.split(":"):
        case ["game", gid]:
            return "game:<id>", gid, None
        case ["game", gid, "player", player]:
            return "game:<id>:player:<n>", gid, player
        case ["game", gid, ("players" | "leaderboard") as what]:
            return f"game:<id>:{what}", gid, None
    return None


def _number(value: str) -> int | str:
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def _score(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _field(name: str, value: str) -> Any:
    """A hash field as a reader decodes it: counters are integers, the pending assist JSON."""
    if name == "pending_assist":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return _number(value) if name in _NUMBERS else value


def _rows(pattern: str, gid: str, player: str | None, value: Any) -> list[Row]:
    """The rows one key holds, by its pattern, as the oracle writes them."""
    if pattern == "game:<id>":
        return [{"id": gid, "pending_assist": None, **{f: _field(f, v) for f, v in value.items()}}]
    if pattern == "game:<id>:player:<n>":
        fields = {f: _field(f, v) for f, v in value.items()}
        return [{"game_id": gid, "player": _number(player or ""), **fields}]
    if pattern == "game:<id>:players":
        return [{"game_id": gid, "player": _number(m)} for m in sorted(value)]
    return [{"game_id": gid, "player": _number(m), "points": _score(p)} for m, p in value]


def read_redis_games(client: redis.Redis, base: str) -> tuple[dict[str, list[Row]], list[str]]:
    """Every key under ``base`` read as a reader of the handler's layout would: the rows of
    each pattern, and the keys that fit no pattern or have another type."""
    keys = sorted(client.scan_iter(match=f"{base}*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    found = [(key, _pattern(key.removeprefix(base))) for key in keys]
    known = [
        (key, what)
        for (key, what), kind in zip(found, pipe.execute(), strict=True)
        if what is not None and REDIS_TYPES[what[0]] == kind
    ]
    for key, (pattern, _, _) in known:
        if pattern == "game:<id>:players":
            pipe.smembers(key)
        elif pattern == "game:<id>:leaderboard":
            pipe.zrange(key, 0, -1, withscores=True)
        else:
            pipe.hgetall(key)
    rows: dict[str, list[Row]] = {pattern: [] for pattern in REDIS_TYPES}
    for (_, what), value in zip(known, pipe.execute(), strict=True):
        rows[what[0]] += _rows(*what, value)
    return rows, sorted(set(keys) - {key for key, _ in known})


def clear_redis(s: Settings) -> int:
    """Delete the demo's Redis keys (all of ``<prefix>:*``); how many there were."""
    with redis_client(s) as client:
        keys = list(client.scan_iter(match=f"{s.redis_prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
    return len(keys)


# ------------------------------------------------------------------------------ the seed's CDC

SCHOOL = "school"  # the merge projection over the three change topics, and its view schema
CDC_REDELIVERED = 0.2  # published again at random places, and as many older ones after the rest
CDC_BATCH = 25  # smaller batches: a row's changes mostly land in different ones


SCHOOL_HISTORY = f"{SCHOOL}.enrolment_history"  # handlers.school_history's business events
TX_TOPIC = "school.transaction"  # Debezium's transaction metadata topic (BEGIN/END records)
BUSINESS_TOPIC = "school.business"  # where the outbox publishes the business events


def cdc_topic(table: str) -> str:
    """A source table's change topic, named like Debezium's (without the demo's prefix)."""
    return f"public.{table}"


def school_projection(s: Settings) -> dict[str, Any]:
    """The merge projection over the three change topics and the transaction topic, with the
    seed's correlation: one business event per transaction, named by
    ``handlers.school_correlation`` and kept by ``handlers.school_history``."""
    return {
        "name": SCHOOL,
        "mode": "merge",
        "topics": [*(s.topic(cdc_topic(t)) for t in cdc.TABLES), s.topic(TX_TOPIC)],
        "decoder": {"kind": "debezium"},
        "handlers": ["handlers.school", "handlers.school_history"],
        "batch_max_messages": CDC_BATCH,
        "correlation": {
            "rule": "handlers.school_correlation:name_business_events",
            "window": "10s",
            "parts": {t: f"public.{t}" for t in cdc.TABLES},
            "transaction_metadata": True,
            # Each topic is shuffled in full here, so a partition's event time goes back and
            # forth; an hour's lateness lets every window close by its END record's counts.
            "lateness": "1h",
            "outbox": {"topic": s.topic(BUSINESS_TOPIC)},
        },
    }


def make_school_views(state: cdc.SchoolState) -> dict[str, View]:
    columns = ("student_id", "student_name", "course_id", "course_name", "teacher")
    enrolments = {(r[0], r[2]): dict(zip(columns, r, strict=True)) for r in state.enrolment_view()}
    students = {
        sid: {"student_id": sid, "student_name": name, "courses": courses}
        for sid, name, courses in state.student_courses()
    }
    views = [
        View(f"{SCHOOL}.enrolment_view", ("student_id", "course_id"), enrolments),
        View(f"{SCHOOL}.student_courses", ("student_id",), students),
    ]
    return {v.table: v for v in views}


@dataclass(frozen=True)
class Unenrolment:
    """An enrolment undone later by its own transaction, whose student and course remain."""

    enrolled: cdc.Change  # the student_course row's create
    unenrolled: cdc.Change  # its delete
    tombstone: cdc.Change  # Debezium's null value after the delete
    student: Row  # the student's row as the log ends
    course: Row  # the course's row as the log ends

    @property
    def student_id(self) -> int:
        return int(self.enrolled.key["student_id"])

    @property
    def stream(self) -> str:
        """The row's stream, as the Debezium decoder names it."""
        return f"student_course:{self.student_id},{self.course['id']}"

    @property
    def course_name(self) -> str:
        return f"{self.course['name']} (course {self.course['id']})"


def find_unenrolment(log: Sequence[cdc.Transaction], state: cdc.SchoolState) -> Unenrolment:
    """An enrolment that was created, then deleted in a transaction of its own (not a change
    of course, not a student's deletion), of the student with the most other courses left."""
    rows: dict[tuple[int, int], list[cdc.Change]] = {}
    alone: set[int] = set()  # the LSNs of unenrolments that are their transaction's only change
    for tx in log:
        for change in tx.changes:
            if change.table == "student_course":
                key = (change.key["student_id"], change.key["course_id"])
                rows.setdefault(key, []).append(change)
        if [c.payload and c.payload["op"] for c in tx.changes] == ["d", None]:
            alone.add(tx.changes[0].lsn)
    courses = {sid: sum(s == sid for s, _ in state.enrolments) for sid in state.students}
    candidates = [
        (sid, cid)
        for (sid, cid), changes in rows.items()
        if [c.payload and c.payload["op"] for c in changes] == ["c", "d", None]
        and changes[1].lsn in alone
        and courses.get(sid, 0) > 0
        and cid in state.courses
    ]
    if not candidates:
        raise ValueError("the school log has no enrolment undone on its own")
    sid, cid = max(candidates, key=lambda k: courses[k[0]])  # the first of the most
    enrolled, unenrolled, tombstone = rows[(sid, cid)]
    return Unenrolment(enrolled, unenrolled, tombstone, state.students[sid], state.courses[cid])


def with_early_unenrolment(
    messages: list[cdc.Change], case: Unenrolment
) -> tuple[list[cdc.Change], int]:
    """The student_course topic's ``messages`` with the case's row published as the unenrolment
    and its tombstone where the row's first message was, the enrolment last of all; and how
    many messages come between them."""
    key = case.enrolled.key
    first = next(i for i, m in enumerate(messages) if m.key == key)
    rest = [m for m in messages if m.key != key]
    out = [*rest[:first], case.unenrolled, case.tombstone, *rest[first:], case.enrolled]
    return out, len(rest) - first


@dataclass(frozen=True)
class CdcDelivery:
    """One source table's change topic: its messages in commit order and as published."""

    table: str
    topic: str
    log: list[cdc.Change]
    messages: list[cdc.Change]

    @property
    def changes(self) -> int:
        return sum(c.payload is not None for c in self.log)

    @property
    def tombstones(self) -> int:
        return len(self.log) - self.changes

    @property
    def redelivered(self) -> int:
        return len(self.messages) - len(self.log)

    @property
    def early(self) -> int:
        """Messages published before an older message of their own row (one row: one key,
        so one partition, consumed in this order)."""
        seqs: dict[tuple[str, int, bool], int] = {}  # a message's place among its row's
        counts: dict[str, int] = {}
        for change in self.log:
            row = _message(change)[0]
            counts[row] = counts.get(row, 0) + 1
            seqs[_message(change)] = counts[row]
        return count_early({"stream": m[0], "seq": seqs[m]} for m in map(_message, self.messages))


def _message(change: cdc.Change) -> tuple[str, int, bool]:
    """What tells a table's messages apart: the row's key, the LSN and whether a tombstone."""
    return json.dumps(change.key, sort_keys=True), change.lsn, change.payload is None


def deliver_changes(
    s: Settings, rng: random.Random, log: Sequence[cdc.Transaction], case: Unenrolment
) -> tuple[list[CdcDelivery], int]:
    """Each table's topic shuffled with re-deliveries, the case's unenrolment before its
    enrolment; and how many messages come between those two."""
    deliveries, between = [], 0
    for table, changes in cdc.by_table(log).items():
        messages = cdc.redelivered(rng, changes, CDC_REDELIVERED)
        if table == "student_course":
            messages, between = with_early_unenrolment(messages, case)
        deliveries.append(CdcDelivery(table, s.topic(cdc_topic(table)), changes, messages))
    return deliveries, between


# ------------------------------------------------------------------------------ delivery


@dataclass(frozen=True)
class Delivery:
    projection: str
    topic: str
    events: int  # in the ordered log
    messages: list[Wire]  # as published
    withheld: list[Wire]  # in the log, never published
    replay_topic: str | None = None  # where replays of them come back

    @property
    def duplicates(self) -> int:
        return len(self.messages) + len(self.withheld) - self.events

    @property
    def early(self) -> int:
        """Counted as if the withheld events came last, as they do, through replay."""
        return count_early([*self.messages, *self.withheld])

    def parked_behind(self) -> int:
        """How many events wait behind the withheld ones until replay brings them."""
        missing = {e["stream"]: e["seq"] for e in self.withheld}
        return len(
            {_key(e) for e in self.messages if e["seq"] > missing.get(e["stream"], e["seq"])}
        )


def choose_withheld(rng: random.Random, log: Sequence[Wire], count: int) -> list[Wire]:
    """``count`` events of as many streams, each with a later event of its stream in ``log``
    (a stream's newest event can't be noticed missing: nothing says it exists)."""
    last: dict[str, int] = {}
    for event in log:
        last[event["stream"]] = max(last.get(event["stream"], 0), event["seq"])
    streams = rng.sample(sorted(s for s, n in last.items() if n >= 3), count)
    seqs = {s: rng.randint(2, last[s] - 1) for s in streams}
    chosen = [e for e in log if seqs.get(e["stream"]) == e["seq"]]
    return sorted(chosen, key=lambda e: _natural((e["stream"].split(":")[-1], e["seq"])))


def deliver(
    rng: random.Random,
    log: list[Wire],
    case: SeedCase | None = None,
    withheld: Sequence[Wire] = (),
) -> list[Wire]:
    """``log`` without ``withheld``, shuffled within windows and ``DUPLICATES`` of it published
    twice."""
    keep = {_key(e) for e in withheld}
    log = [e for e in log if _key(e) not in keep]
    messages = scenarios.shuffle_within_windows(rng, log, WINDOW)
    if case is not None:
        messages = with_seed_disorder(messages, case)
    return scenarios.with_duplicates(rng, messages, DUPLICATES)


def count_early(messages: Iterable[Wire]) -> int:
    """Events published before an earlier event of their own stream: projector must hold them
    back until their predecessors arrive. (A stream's events share a key, so a partition, so
    they are consumed in this order.)"""
    seen: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    early = 0
    for event in messages:
        stream, seq = event["stream"], event["seq"]
        got = seen.setdefault(stream, set())
        if seq in got:
            continue
        got.add(seq)
        nxt = expected.get(stream, 1)
        early += seq > nxt
        while nxt in got:
            nxt += 1
        expected[stream] = nxt
    return early


def publish(kafka: str, topic: str, messages: Sequence[Wire]) -> None:
    """JSON values keyed by stream, so that each stream lives in one partition."""
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "linger.ms": 5})
    for event in messages:
        producer.produce(topic, value=json.dumps(event).encode(), key=event["stream"].encode())
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not publish every message to {topic}")


# ------------------------------------------------------------------------------ set-up


def recreate_database(s: Settings) -> None:
    name = sql.Identifier(s.database)
    with psycopg.connect(s.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(name))
        conn.execute(sql.SQL("create database {}").format(name))


def _wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    retrying = Retrying(
        retry=retry_if_result(lambda ok: not ok),
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.2),
    )
    try:
        retrying(condition)
    except RetryError:
        raise TimeoutError(f"{what}: not done after {timeout:.0f} s") from None


def _topics(admin: AdminClient) -> dict[str, Any]:
    return dict(admin.list_topics(timeout=10).topics)


def _ready(admin: AdminClient, names: Sequence[str]) -> bool:
    """Every topic known with all its partitions led (the broker accepts writes)."""
    topics = _topics(admin)
    return all(
        n in topics
        and len(topics[n].partitions) == PARTITIONS
        and all(p.leader >= 0 for p in topics[n].partitions.values())
        for n in names
    )


def _exists_yet(exc: BaseException) -> bool:
    """A topic just deleted can still be finishing its deletion: try again."""
    return isinstance(exc, KafkaException) and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS


def recreate_topics(kafka: str, names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    old = [n for n in names if n in _topics(admin)]
    if old:
        for future in admin.delete_topics(old, operation_timeout=30).values():
            future.result(timeout=60)
        _wait_until("deleting the old topics", lambda: not set(old) & set(_topics(admin)))
    retrying = Retrying(
        retry=retry_if_exception(_exists_yet), stop=stop_after_delay(60), wait=wait_fixed(0.5)
    )
    for name in names:
        retrying(_create_topic, admin, name)
    _wait_until("creating the topics", lambda: _ready(admin, names))


def _create_topic(admin: AdminClient, name: str) -> None:
    futures = admin.create_topics([NewTopic(name, PARTITIONS, 1)], operation_timeout=30)
    futures[name].result(timeout=60)


def forget_group(kafka: str, group: str) -> None:
    """Delete a consumer group (the responder's) with its offsets, if it exists and no member
    is still in it (one from an interrupted run soon exits, idle)."""
    admin = AdminClient({"bootstrap.servers": kafka})
    try:
        admin.delete_consumer_groups([group], request_timeout=30)[group].result(timeout=60)
    except KafkaException as exc:
        if exc.args[0].code() not in (KafkaError.GROUP_ID_NOT_FOUND, KafkaError.NON_EMPTY_GROUP):
            raise


def create_event_store_table(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        create_event_store(conn, *EVENT_STORE)


def store_events(dsn: str, log: Sequence[Wire]) -> int:
    """The write side's log, in full, where the responder reads it."""
    with psycopg.connect(dsn) as conn:
        return append_events(conn, log, *EVENT_STORE)


def write_config(s: Settings, projections: Sequence[Projection]) -> Path:
    decoder = {"kind": "json", "stream": "stream", "seq": "seq", "ts": "ts", "type": "type"}
    replay = {
        "gap_timeout": f"{GAP_TIMEOUT:g}s",
        "replay": {
            "channel": "kafka",
            "topic": s.requests_topic,
            "max_interval": f"{MAX_INTERVAL:g}s",
        },
    }
    config = {
        "kafka": {"bootstrap_servers": s.kafka, "group_prefix": s.prefix},
        "postgres": {"dsn": s.dsn, "schema": STATE_SCHEMA},
        "redis": {"url": s.redis_url, "prefix": s.redis_prefix},
        "metrics": {"enabled": False},
        "projections": [
            {
                "name": p.name,
                "topics": [s.topic(p.topic)],
                "handlers": [p.handler],
                "decoder": {**decoder, "data": "data"},
                "batch_max_messages": BATCH,
                **({**replay, "replay_topic": s.topic(p.replay_topic)} if p.replay else {}),
            }
            for p in projections
        ]
        + [
            school_projection(s),
            {
                "name": GAMES_REDIS,
                "store": "redis",
                "topics": [s.topic(GAMES_TOPIC)],
                "handlers": [GAMES_REDIS_HANDLER],
                "decoder": {**decoder, "data": "data"},
                "batch_max_messages": BATCH,
            },
        ],
    }
    s.config_path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `make demo` (projector/demo.py), again on every run.\n"
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    s.config_path.write_text(header + body)
    return s.config_path


# ------------------------------------------------------------------------------ the CLI

_LOG_LINE = re.compile(r"^\S+ (\d\d:\d\d:\d\d)\S* (\w+) \[([^\]]+)\] [\w.]+: (.*)$")
_STOPPED = re.compile(r"^projection (\w+) stopped after (\d+) batches: (\{.*\})$")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _echo(line: str, who: str | None = None) -> None:
    """One line of a command's output, indented; a log line without its date and logger, and
    with ``who`` (if given) in place of its thread."""
    match = _LOG_LINE.match(line)
    if match:
        clock, level, thread, message = match.groups()
        level = "" if level == "INFO" else f"{level} "
        line = f"{clock} {who or thread.removeprefix('projection-'):<9} {level}{message}"
    console.print(Text("  │ " + line, style="dim"), soft_wrap=True)


def _messages(lines: Iterable[str]) -> Iterator[str]:
    """The messages of the log lines among ``lines``."""
    for line in lines:
        if match := _LOG_LINE.match(line):
            yield match.group(4)


class Command:
    """``python -m projector ARGS`` started, shown as ``shown``; its output echoed as it comes
    (by a thread, so it can run in the background) and kept in ``lines``. Killed after
    ``timeout`` seconds."""

    def __init__(
        self,
        args: Sequence[str],
        shown: str,
        *,
        who: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
    ):
        console.print(f"$ {shown}", style="bold", soft_wrap=True)
        self.who = who
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "projector", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._watchdog = threading.Timer(timeout, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            _echo(self.lines[-1], self.who)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it has exited and its output is all shown; raises
        ``subprocess.TimeoutExpired`` if it runs ``timeout`` seconds more."""
        code = self.proc.wait(timeout)
        self._watchdog.cancel()
        self._reader.join(10)
        return code

    def stop(self) -> None:
        """SIGTERM if it still runs (it stops cleanly), SIGKILL if that is not enough."""
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.wait()


def projector(config: Path, *args: str, background: bool = False, timeout: float = 300) -> Command:
    """``projector ARGS -c CONFIG`` started."""
    shown = f"projector {' '.join(args)} -c {_shown(config)}{' &' if background else ''}"
    return Command([*args, "-c", str(config)], shown, timeout=timeout)


def cli(config: Path, *args: str, timeout: float = 300) -> tuple[int, list[str]]:
    """``projector ARGS -c CONFIG`` run to its end, its output echoed as it comes; its exit code
    and output lines. Killed after ``timeout`` seconds."""
    command = projector(config, *args, timeout=timeout)
    try:
        return command.wait(), command.lines
    finally:
        command.stop()


def worker_totals(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per projection, the totals its worker logs when it stops (batches, applied, ...)."""
    totals: dict[str, dict[str, int]] = {}
    for message in _messages(lines):
        if stopped := _STOPPED.match(message):
            name, batches, counts = stopped.groups()
            totals[name] = {"batches": int(batches), **ast.literal_eval(counts)}
    return totals


_REQUESTED = re.compile(r"^projection \w+: requested replay of (\d+) gap\(s\), (\d+) failed$")
_REPLAYED = re.compile(r"^\w+: replayed (\d+) event\(s\) of \S+$")


def replay_counts(daemon: Iterable[str], responder: Iterable[str]) -> tuple[int, int, int]:
    """Replay requests sent (by the daemon's log), requests served and events re-published (by
    the responder's)."""
    sent = sum(
        int(m.group(1)) - int(m.group(2)) for m in map(_REQUESTED.match, _messages(daemon)) if m
    )
    served = [int(m.group(1)) for m in map(_REPLAYED.match, _messages(responder)) if m]
    return sent, len(served), sum(served)


# ------------------------------------------------------------------------------ showing


def _cell(value: Any) -> Text:
    if value is None:
        return Text("—")
    if isinstance(value, dict):
        return Text(json.dumps(value))
    return Text(str(value))


def _natural(key: Any) -> tuple[Any, ...]:
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((0, int(p), "") if str(p).isdigit() else (1, 0, str(p)) for p in parts)


def table(title: str, rows: Sequence[Row]) -> Table:
    out = Table(title=title, title_justify="left", title_style="bold")
    for column in rows[0] if rows else []:
        out.add_column(column)
    for row in rows:
        out.add_row(*(_cell(v) for v in row.values()))
    return out


def fetch(dsn: str, relation: str) -> list[Row]:
    schema, name = relation.split(".")
    query = sql.SQL("select * from {}").format(sql.Identifier(schema, name))
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


def compare(view: View, rows: Sequence[Row]) -> str | None:
    """None when the view holds exactly the oracle's rows, else what differs."""
    actual = {view.key_of(r): r for r in rows}
    missing = len(view.expected.keys() - actual.keys())
    extra = len(actual.keys() - view.expected.keys())
    wrong = sum(actual[k] != view.expected[k] for k in view.expected.keys() & actual.keys())
    if missing == extra == wrong == 0 and len(actual) == len(rows):
        return None
    return f"{missing} missing, {extra} unexpected, {wrong} different rows"


def show_view(dsn: str, view: View, shown: int = SHOWN_ROWS, end: str = "\n") -> bool:
    """The view's first ``shown`` rows (none: only the verdict line, then ``end``) and whether
    it equals its oracle."""
    rows = sorted(fetch(dsn, view.table), key=lambda r: _natural(view.key_of(r)))
    if shown:
        console.print(table(f"{view.table}: {len(rows)} rows, the first {shown}", rows[:shown]))
    problem = compare(view, rows)
    if problem is None:
        console.print(f"[green]✓[/] {view.table} equals its oracle, all {len(rows)} rows{end}")
    else:
        console.print(f"[red]✗ {view.table} differs from its oracle: {problem}[/]{end}")
    return problem is None


def show_seed_case(dsn: str, case: SeedCase, views: Mapping[str, View]) -> bool:
    gid = case.game_id
    game = [r for r in fetch(dsn, "games.games") if r["id"] == gid]
    box = [r for r in fetch(dsn, "games.player_stats") if r["game_id"] == gid]
    console.print(f"Game {gid}, published as  {_plays(case.as_published())}")
    console.print(table(f"games.games, game {gid}", game))
    involved = {case.assist["data"]["player"], case.point["data"]["player"]}
    shown = sorted((r for r in box if r["player"] in involved), key=lambda r: int(r["player"]))
    console.print(table(f"games.player_stats, game {gid}: the passer and the scorer", shown))
    ok = compare(views["games.games"].only(lambda k: k == gid), game) is None
    ok = compare(views["games.player_stats"].only(lambda k: k[0] == gid), box) is None and ok
    verdict = "[green]✓[/] equal" if ok else "[red]✗ NOT equal[/]"
    console.print(
        f"{verdict} to the oracle: game {gid}'s score and all {len(box)} of its box-score rows"
    )
    return ok


def show_redis_games(s: Settings, views: Mapping[str, View], case: SeedCase) -> bool:
    base = redis_views(s)
    console.print(
        f"\n{GAMES_REDIS}: the same plays, from the same topic, projected into Redis by"
        f" {GAMES_REDIS_HANDLER}. Its keys are {base} and then, per game, a hash game:<id>, a"
        " hash game:<id>:player:<n> per player of its box score, the set game:<id>:players of"
        " those players and the sorted set game:<id>:leaderboard of their points. Every key"
        " under that prefix is read back by this layout and compared with the same oracle.\n"
    )
    with redis_client(s) as client:
        rows, stray = read_redis_games(client, base)
        ok = all([show_redis_view(views[pattern], rows[pattern]) for pattern in REDIS_TYPES])
        if stray:
            shown = ", ".join(k.removeprefix(base) for k in stray[:3])
            what = (
                f"{len(stray)} key{'' if len(stray) == 1 else 's'} of no pattern or of another type"
            )
            console.print(f"[red]✗ {what}: {shown}[/]")
        ok = show_leaderboard(client, base, case.game_id, views) and not stray and ok
    return ok


def show_redis_view(view: View, rows: Sequence[Row]) -> bool:
    """The verdict line of one key pattern: whether its keys hold the oracle's rows."""
    noun = "hashes" if view.table.endswith(">") else "members"
    problem = compare(view, rows)
    if problem is None:
        console.print(f"[green]✓[/] {view.table} equals its oracle, all {len(rows)} {noun}")
    else:
        console.print(f"[red]✗ {view.table} differs from its oracle: {problem}[/]")
    return problem is None


def show_leaderboard(client: redis.Redis, base: str, gid: str, views: Mapping[str, View]) -> bool:
    """Game ``gid``'s top players as a reader gets them: the sorted set's top entries, then
    their hashes; and whether they are the oracle's."""
    key = f"{base}game:{gid}:leaderboard"
    top = cast(
        list[tuple[str, float]], client.zrange(key, 0, PODIUM - 1, desc=True, withscores=True)
    )
    pipe = client.pipeline(transaction=False)
    for member, _ in top:
        pipe.hgetall(f"{base}game:{gid}:player:{member}")
    lines = []
    for rank, ((member, points), line) in enumerate(zip(top, pipe.execute(), strict=True), 1):
        team, assists = line.get("team"), line.get("assists")
        lines.append(
            {
                "#": rank,
                "player": member,
                "team": team,
                "points": _score(points),
                "assists": assists,
            }
        )
    console.print(
        f"\nGame {gid}'s leaderboard, as a reader gets it: ZRANGE {key} 0 {PODIUM - 1} REV"
        " WITHSCORES, then each player's hash"
    )
    console.print(table(f"{GAMES_REDIS}:game:{gid}:leaderboard, the top {PODIUM}", lines))
    board = [r for k, r in views["game:<id>:leaderboard"].expected.items() if k[0] == gid]
    # Redis's order: by score, ties by member (a string), both reversed by REV.
    board.sort(key=lambda r: (r["points"], str(r["player"])), reverse=True)
    expected = [(str(r["player"]), r["points"]) for r in board[:PODIUM]]
    ok = [(member, _score(points)) for member, points in top] == expected
    verdict = "[green]✓[/] equal" if ok else "[red]✗ NOT equal[/]"
    console.print(f"{verdict} to the oracle: game {gid}'s top {PODIUM} by points, in Redis's order")
    return ok


def show_school(dsn: str, case: Unenrolment, views: Mapping[str, View]) -> bool:
    enrolments, students = views[f"{SCHOOL}.enrolment_view"], views[f"{SCHOOL}.student_courses"]
    console.print(
        f"\n{SCHOOL}: handlers.school mirrors each source table into a table of its own; two SQL"
        " views join them: enrolment_view, one row per enrolment, and student_courses, one row"
        " per student with the courses as a JSON array. Their oracle folds the change events"
        " in commit order into plain dictionaries and joins those.\n"
    )
    ok = show_view(dsn, enrolments, end="")
    ok = show_view(dsn, students, shown=0, end="") and ok
    return show_unenrolment(dsn, case, enrolments) and ok


def show_business(s: Settings, expected: Sequence[tuple[str, str]], case: Unenrolment) -> bool:
    """The seed's question answered: one business event per transaction, whatever the order
    its changes came in; compared by id and type with the rule applied to each transaction's
    changes, in commit order."""
    console.print(
        f"\nThe business events: the correlation gathered each transaction's changes from the"
        f" three topics (its key the transaction id, its END record saying when all are in) and"
        f" handlers.school_correlation named what it did; handlers.school_history keeps them in"
        f" {SCHOOL_HISTORY}, keyed by the id derived from the transaction and its changes.\n"
    )
    rows = fetch(s.dsn, SCHOOL_HISTORY)
    counts: dict[str, list[int]] = {}
    for _, kind in expected:
        counts.setdefault(kind, [0, 0])[0] += 1
    for row in rows:
        counts.setdefault(row["type"], [0, 0])[1] += 1
    out = Table("business event", "oracle", SCHOOL_HISTORY)
    for kind, (want, got) in sorted(counts.items()):
        out.add_row(kind, str(want), str(got))
    console.print(out)
    mine = sorted((r for r in rows if r["student_id"] == case.student_id), key=lambda r: r["at"])
    shown = [{k: r[k] for k in ("type", "course_id", "at")} for r in mine]
    console.print(table(f"{SCHOOL_HISTORY}, student {case.student_id}", shown))
    actual = sorted((r["business_id"], r["type"]) for r in rows)
    ok = _verdict(SCHOOL_HISTORY, actual, expected)
    return show_published(s, expected) and ok


def _verdict(
    where: str, actual: Sequence[tuple[str, str]], expected: Sequence[tuple[str, str]]
) -> bool:
    ok = sorted(actual) == sorted(expected)
    if ok:
        console.print(f"[green]✓[/] {where} equals its oracle, all {len(actual)} events")
    else:
        missing = len(set(expected) - set(actual))
        extra = len(actual) - len(set(actual) & set(expected))
        console.print(
            f"[red]✗ {where} differs from its oracle: {missing} missing, {extra} unexpected[/]"
        )
    return ok


def show_published(s: Settings, expected: Sequence[tuple[str, str]]) -> bool:
    """The outbox's side: each business event on the business topic, with its id in the
    ``projector-event-id`` header (at least once: a consumer de-duplicates on it)."""
    topic = s.topic(BUSINESS_TOPIC)
    ids: dict[str, str] = {}
    sent = 0
    for value, event_id in read_topic(s.kafka, topic):
        if event_id is not None:
            ids[event_id] = json.loads(value)["type"]
            sent += 1
    console.print(
        f"\nThe outbox: written in each batch's transaction, published by the daemon to {topic}"
        f" with the id in the {HEADER_ID} header; {sent} messages, {len(ids)} distinct ids."
    )
    return _verdict(f"{topic}, de-duplicated by id,", list(ids.items()), expected)


def read_topic(kafka: str, topic: str) -> list[tuple[bytes, str | None]]:
    """Every message of ``topic`` (its value and its ``projector-event-id`` header), read from
    the start to its end."""
    ends = high_watermarks(kafka, [(topic, p) for p in range(PARTITIONS)])
    consumer = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": "projector-demo-reader",
            "enable.auto.commit": False,
        }
    )
    out: list[tuple[bytes, str | None]] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        deadline = time.monotonic() + 30
        while len(out) < sum(ends.values()) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                headers = message.headers() or []
                pairs = headers.items() if isinstance(headers, dict) else headers
                ids = [v for k, v in pairs if k == HEADER_ID and isinstance(v, bytes)]
                out.append((message.value() or b"", ids[0].decode() if ids else None))
    finally:
        consumer.close()
    return out


def show_unenrolment(dsn: str, case: Unenrolment, view: View) -> bool:
    sid, cid, course = case.student_id, case.course["id"], case.course_name
    rows = [r for r in fetch(dsn, view.table) if r["student_id"] == sid]
    rows.sort(key=lambda r: int(r["course_id"]))
    row = [
        r for r in fetch(dsn, f"{SCHOOL}.enrolments") if r == {"student_id": sid, "course_id": cid}
    ]
    console.print(
        f"\nStudent {sid} ({case.student['name']}), whose unenrolment from {course} was"
        " published before the enrolment:"
    )
    console.print(table(f"{view.table}, student {sid}", rows))
    mark = document_mark(dsn, case.stream)
    if mark is not None and mark.kind is Kind.DELETE:
        console.print(
            f"{STATE_SCHEMA}.documents keeps {case.stream} deleted at LSN {mark.ts}, a tombstone:"
            f" the enrolment's create, at LSN {case.enrolled.lsn}, is older and changed nothing."
        )
    ok = compare(view.only(lambda k: k[0] == sid), rows) is None and not row
    verdict = "[green]✓[/] equal" if ok else "[red]✗ NOT equal[/]"
    console.print(
        f"{verdict} to the oracle: student {sid}'s {len(rows)}"
        f" enrolment{'' if len(rows) == 1 else 's'}, none in {course},"
        f" and no row ({sid}, {cid}) in {SCHOOL}.enrolments"
    )
    return ok


def document_mark(dsn: str, stream: str) -> Mark | None:
    """The newest assertion about a whole merge document, from projector's merge state."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            f"select state from {STATE_SCHEMA}.documents where projection = %s and stream = %s",
            (SCHOOL, stream),
        ).fetchone()
    return None if found is None else DocState.from_json(found[0]).root.mark


def _count(conn: psycopg.Connection[Any], table_name: str) -> int:
    query = sql.SQL("select count(*) from {}").format(sql.Identifier(STATE_SCHEMA, table_name))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def replay_state(dsn: str, projection: str) -> tuple[dict[tuple[str, int, int], int], int]:
    """The projection's open gaps, (stream, from_seq, to_seq) with their replay requests so
    far, and how many events it has parked."""
    with psycopg.connect(dsn) as conn:
        gaps = conn.execute(
            f"select stream, from_seq, to_seq, attempts from {STATE_SCHEMA}.gaps"
            " where projection = %s and state = 'open'",
            (projection,),
        ).fetchall()
        parked = conn.execute(
            f"select count(*) from {STATE_SCHEMA}.holding where projection = %s", (projection,)
        ).fetchone()
    return {(g[0], g[1], g[2]): g[3] for g in gaps}, int(parked[0]) if parked else 0


def show_state(s: Settings) -> bool:
    with psycopg.connect(s.dsn) as conn:
        counts = {t: _count(conn, t) for t in ("holding", "gaps", "dead_letters")}
        # Closed windows keep their part ids (to know re-deliveries), with no parts open.
        counts["correlations"] = _count_open_correlations(conn)
        checkpoints: list[tuple[str, str, int, int | None]] = conn.execute(
            "select projection, topic, partition, next_offset"
            f" from {STATE_SCHEMA}.checkpoints order by 1, 2, 3"
        ).fetchall()
    for name, what in (
        ("holding", "parked events"),
        ("gaps", "gaps"),
        ("dead_letters", "dead letters"),
        ("correlations", "correlations still open"),
    ):
        mark = "[green]✓[/]" if counts[name] == 0 else "[red]✗[/]"
        console.print(f"{mark} {what} ({STATE_SCHEMA}.{name}): {counts[name]}")
    in_redis, redis_checkpoints = redis_state(s)
    for where, count in in_redis.items():
        mark = "[green]✓[/]" if count == 0 else "[red]✗[/]"
        console.print(f"{mark} {where}: {count}")
    checkpoints += redis_checkpoints
    ends = high_watermarks(s.kafka, [(t, p) for _, t, p, _ in checkpoints])
    # No checkpoint yet: nothing read, which is the end of a partition that is still empty.
    read = sum((offset or 0) == ends[(t, p)] for _, t, p, offset in checkpoints)
    mark = "[green]✓[/]" if read == len(checkpoints) else "[red]✗[/]"
    console.print(f"{mark} partitions read to their end: {read} of {len(checkpoints)}")
    out = Table("projection", "partition", "checkpoint", "end of partition", title_justify="left")
    out.title = (
        f"{STATE_SCHEMA}.checkpoints, committed with the views ({GAMES_REDIS}'s: in Redis,"
        f" {s.redis_prefix}:s:{GAMES_REDIS}:offsets)"
    )
    for projection, topic, partition, offset in checkpoints:
        checkpoint = "—" if offset is None else str(offset)
        out.add_row(
            projection, Text(f"{topic}[{partition}]"), checkpoint, str(ends[(topic, partition)])
        )
    console.print(out)
    return read == len(checkpoints) and not any(counts.values()) and not any(in_redis.values())


def _count_open_correlations(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        f"select count(*) from {STATE_SCHEMA}.correlations"
        " where record is not null and record->'parts' <> '{}'::jsonb"
    ).fetchone()
    return 0 if row is None else int(row[0])


def redis_state(s: Settings) -> tuple[dict[str, int], list[tuple[str, str, int, int | None]]]:
    """games_redis's parked events, gaps and dead letters, each with where it is kept, and its
    checkpoints, read from Redis by the layout of docs/redis.md."""
    fence = f"{s.redis_prefix}:s:{GAMES_REDIS}:"
    with redis_client(s) as client:
        version = client.get(f"{fence}version") or "1"
        base = f"{fence}{version}:"
        streams = sorted(client.scan_iter(match=f"{base}st:*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in streams:
            pipe.hkeys(key)
        pipe.zcard(f"{base}gaps").zcard(f"{base}gapskipped").hlen(f"{base}dl")
        pipe.hgetall(f"{fence}offsets")
        *fields, gaps, skipped, dead, offsets = pipe.execute()
    parked = sum(f.startswith("p:") for names in fields for f in names)  # p:<seq>: parked
    counts = {
        f"parked events ({base}st:<stream>)": parked,
        f"gaps ({base}gaps)": gaps + skipped,
        f"dead letters ({base}dl)": dead,
    }
    topic = s.topic(GAMES_TOPIC)
    # Every partition: one that was never read has no offset yet.
    next_offsets = [offsets.get(f"{topic}:{p}") for p in range(PARTITIONS)]
    checkpoints: list[tuple[str, str, int, int | None]] = [
        (GAMES_REDIS, topic, p, None if offset is None else int(offset))
        for p, offset in enumerate(next_offsets)
    ]
    return counts, checkpoints


def high_watermarks(
    kafka: str, partitions: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "projector-demo-watermarks"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t, p in partitions
        }
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ the story


def section(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}", align="left")


def introduce() -> None:
    console.rule("[bold]projector demo")
    console.print(
        "Four read models (bank accounts, customers, basketball box scores, in PostgreSQL and"
        " again in Redis, and students' courses from a database's change events) built from"
        " events published out of order,"
        " some twice and a few never (projector notices the gaps and asks the write side to"
        " replay them), then compared row by row with what the events, in their true order, say"
        " they must hold: the oracle."
    )


def set_up(s: Settings, projections: Sequence[Projection]) -> Path:
    section("1. A fresh database, fresh topics, no Redis keys, a config")
    recreate_database(s)
    console.print(f"database     {redact(s.dsn)}  (dropped and created)")
    create_event_store_table(s.dsn)
    console.print(
        f"event store  {'.'.join(EVENT_STORE)} in that database: the accounts write side's log"
    )
    replayed = [p for p in projections if p.replay]
    topics = [s.topic(p.topic) for p in projections]
    if replayed:
        topics += [s.requests_topic, *(s.topic(p.replay_topic) for p in replayed)]
        forget_group(s.kafka, s.responder_group)
    topics += [*(s.topic(cdc_topic(t)) for t in cdc.TABLES), s.topic(TX_TOPIC)]
    topics += [s.topic(BUSINESS_TOPIC)]
    recreate_topics(s.kafka, topics)
    console.print(f"topics       {', '.join(topics)}  ({PARTITIONS} partitions each)")
    deleted = clear_redis(s)
    console.print(
        f"redis        {redact(s.redis_url)}, keys {s.redis_prefix}:*  ({deleted} deleted)"
    )
    config = write_config(s, projections)
    names = ", ".join([*(p.name for p in projections), SCHOOL, GAMES_REDIS])
    console.print(f"config       {_shown(config)}  (projections {names})")
    for p in replayed:
        console.print(
            f"             {p.name}: gap_timeout {GAP_TIMEOUT:g}s (short, for the demo),"
            f" replay requests on {s.requests_topic}, replays back on {s.topic(p.replay_topic)}"
        )
    console.print(
        f"             {SCHOOL}: mode merge over the three change topics, Debezium decoder"
        " (a row's stream is <table>:<key>, its timestamp the change's LSN); a correlation"
        f" over them and {s.topic(TX_TOPIC)} names one business event per transaction"
    )
    console.print(
        f"             {GAMES_REDIS}: store redis, {GAMES_REDIS_HANDLER}, reads"
        f" {s.topic(GAMES_TOPIC)} too (its own consumer group), keys under {s.redis_prefix}:"
    )
    return config


def check_and_migrate(config: Path) -> int:
    section("2. Check the config, create the tables")
    return cli(config, "check-config")[0] or cli(config, "migrate")[0]


def publish_all(
    s: Settings, rng: random.Random, projections: Sequence[Projection], case: SeedCase
) -> list[Delivery]:
    section("3. Publish the events: shuffled, some twice, a few not at all")
    deliveries = []
    for p in projections:
        withheld = choose_withheld(rng, p.log, WITHHELD) if p.replay else []
        messages = deliver(rng, p.log, case if p.name == "games" else None, withheld)
        replay_topic = s.topic(p.replay_topic) if p.replay else None
        deliveries.append(
            Delivery(p.name, s.topic(p.topic), len(p.log), messages, withheld, replay_topic)
        )
    out = Table("topic", "events", "published", "out of order", "twice", "withheld")
    for d in deliveries:
        publish(s.kafka, d.topic, d.messages)
        out.add_row(
            d.topic,
            str(d.events),
            str(len(d.messages)),
            str(d.early),
            str(d.duplicates),
            str(len(d.withheld)),
        )
    console.print(out)
    console.print(
        f"Keyed by stream, so each stream is in one partition. No message moved more than {WINDOW}"
        f" places in its topic and {DUPLICATES:.0%} were published twice. 'Out of order': events"
        " published before an earlier event of their own stream.\n"
    )
    for p, d in zip(projections, deliveries, strict=True):
        if d.withheld:
            stored = store_events(s.dsn, p.log)
            console.print(
                f"Withheld: {len(d.withheld)} {p.name} events never reach {d.topic}. Only the"
                f" write side's event store has them: {'.'.join(EVENT_STORE)} holds the full"
                f" log, all {stored} events."
            )
            console.print(table(f"withheld from {d.topic}", [_withheld_row(e) for e in d.withheld]))
            console.print(
                "None is its stream's newest event: a missing event shows only once a later"
                " event of its stream arrives.\n"
            )
    console.print(f"The seed's basketball question: in game {case.game_id} the plays were")
    console.print(f"    {_plays(case.as_played())}")
    console.print("and they are published, like the seed's, as")
    console.print(f"    {_plays(case.as_published())}")
    return deliveries


def publish_cdc(
    s: Settings, rng: random.Random, log: Sequence[cdc.Transaction], case: Unenrolment
) -> list[CdcDelivery]:
    console.print(
        "\nThe seed's CDC question: students, courses and their n:n enrolments, as the Debezium"
        " change events of the tables STUDENT, COURSE and STUDENT_COURSE, each on its own topic,"
        f" for the merge projection {SCHOOL}."
    )
    deliveries, between = deliver_changes(s, rng, log, case)
    out = Table("topic", "changes", "published", "out of order", "again")
    cdc.publish_topics(s.kafka, {d.topic: d.messages for d in deliveries}, envelope=True)
    for d in deliveries:
        out.add_row(d.topic, str(d.changes), str(len(d.messages)), str(d.early), str(d.redelivered))
    records = publish_transactions(s, log)
    out.add_row(s.topic(TX_TOPIC), "-", str(records), "0", "0")
    console.print(out)
    tombstones = sum(d.tombstones for d in deliveries)
    console.print(
        f"{len(log)} transactions of a school database (enrolments, changes of course, new"
        " teachers, unenrolments, students deleted) as Debezium writes them: keyed by primary"
        f" key, so each row is in one partition, and each delete followed by a tombstone"
        f" ({tombstones} here, counted in 'published'). Every topic shuffled in full,"
        f" {CDC_REDELIVERED:.0%} of its messages published again at random places and as many"
        " older ones again after the rest: stale re-deliveries. The three topics are read side"
        " by side, so an enrolment can also come before its student or its course."
        f" {s.topic(TX_TOPIC)} has each transaction's BEGIN and END records, in commit order:"
        " END says how many changes of each table the transaction made.\n"
    )
    sid, name = case.student_id, case.student["name"]
    console.print(
        f"The highlight: student {sid} ({name}) was enrolled in {case.course_name} at LSN"
        f" {case.enrolled.lsn} and unenrolled at LSN {case.unenrolled.lsn}. On"
        f" {s.topic(cdc_topic('student_course'))} that is published the other way round:"
    )
    console.print(f"    unenrolment  →  tombstone  →  {between} other messages  →  enrolment")
    return deliveries


def publish_transactions(s: Settings, log: Sequence[cdc.Transaction]) -> int:
    """The transaction topic: BEGIN and END of each transaction, in commit order, on one
    partition as Debezium keeps it."""
    producer = Producer({"bootstrap.servers": s.kafka, "enable.idempotence": True})
    records = [r for tx in log for r in cdc.transaction_records(tx)]
    for key, value in records:
        producer.produce(s.topic(TX_TOPIC), value=value, key=key, partition=0)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not publish every message to {s.topic(TX_TOPIC)}")
    return len(records)


def _withheld_row(event: Wire) -> Row:
    return {"stream": event["stream"], "seq": event["seq"], "type": event["type"], **event["data"]}


def run_projector(
    s: Settings,
    config: Path,
    deliveries: Sequence[Delivery],
    cdc_deliveries: Sequence[CdcDelivery],
) -> int:
    section("4. Run projector until it has caught up; replay fills the gaps")
    replayed = [d for d in deliveries if d.withheld]
    started = time.monotonic()
    daemon = projector(config, "run", "--exit-when-caught-up", background=True, timeout=120)
    responder: Command | None = None
    try:
        if replayed:
            if not await_gaps(s, daemon, replayed):
                daemon.stop()
                return daemon.wait() or 1
            cli(config, "gaps", "list")
            responder = start_responder(s, replayed)
        code = daemon.wait()
        console.print(f"projector run: exit code {code} after {time.monotonic() - started:.1f} s")
        if responder is not None:
            end_responder(responder)
    finally:
        for command in (daemon, responder):
            if command is not None:
                command.stop()
    totals = worker_totals(daemon.lines)
    if totals and code == 0:
        events = {d.projection: d.events for d in deliveries}
        events[SCHOOL] = sum(d.changes for d in cdc_deliveries)
        events[GAMES_REDIS] = events.get("games", 0)
        console.print(run_table(totals, events))
        sequenced = ", ".join(d.projection for d in deliveries)
        console.print(
            f"{sequenced}: each event applied once, in its stream's order. An early event waited"
            " for its predecessors: in memory when they came in the same batch, parked in"
            f" {STATE_SCHEMA}.holding when they came in a later one (batches of {BATCH} here)."
            f" {GAMES_REDIS} did the same with the games' plays, its positions and parked events"
            f" in Redis ({s.redis_prefix}:s:{GAMES_REDIS}:<version>:st:<stream>), each batch with its"
            " checkpoints and views in one script."
        )
        ignored = totals.get(SCHOOL, {}).get("ignored", 0)
        console.print(
            f"{SCHOOL} merges instead: each field of a row keeps the value of the newest LSN,"
            " whatever the order, so nothing waits. A change that altered nothing (stale or"
            " repeated) counts as a duplicate, unless merged in the same batch as a newer change"
            f" of its row. The {ignored} messages the merge ignored are the tombstones"
            " (re-deliveries included), whose delete said it all, and the BEGIN/END records,"
            " which only the correlation reads."
        )
    if responder is not None and code == 0:
        show_fill(s, daemon, responder, replayed)
    return code


def await_gaps(s: Settings, daemon: Command, replayed: Sequence[Delivery]) -> bool:
    """Wait until each withheld event's gap is open and asked for, with every event after it
    parked (the daemon has read the rest); then tell it. False if that never comes."""

    def asked() -> bool:
        if not daemon.running:
            return True
        for d in replayed:
            gaps, parked = replay_state(s.dsn, d.projection)
            expected = {(e["stream"], e["seq"], e["seq"]) for e in d.withheld}
            if gaps.keys() != expected or min(gaps.values()) < 1 or parked != d.parked_behind():
                return False
        return True

    try:
        _wait_until("the withheld events' gaps", asked, timeout=60)
    except TimeoutError as exc:
        console.print(f"[red]✗ {exc}[/]")
        return False
    if not daemon.running:
        console.print("[red]✗ projector run ended before the withheld events were asked for[/]")
        return False
    for d in replayed:
        console.print(
            f"{d.projection}: the {d.parked_behind()} events after the {len(d.withheld)} withheld"
            f" ones in their streams are parked in {STATE_SCHEMA}.holding, and a gap is open"
            f" before each. After gap_timeout ({GAP_TIMEOUT:g} s) the daemon asked for them"
            f" ('requested replay' above) on {s.requests_topic}, and asks again, ever less often"
            f" (at most {MAX_INTERVAL:g} s apart), while they stay open; with a replay channel,"
            " --exit-when-caught-up waits for them. No write side answers yet:"
        )
    return True


def start_responder(s: Settings, replayed: Sequence[Delivery]) -> Command:
    """The reference responder (``projector replay-responder``), in the background."""
    (d,) = replayed  # one responder, one target topic: one projection with replay here
    target = d.replay_topic or d.topic
    console.print(
        f"\nNow the write side's reference responder: it takes the requests from"
        f" {s.requests_topic}, reads the events from {'.'.join(EVENT_STORE)} and re-publishes"
        f" them, as first published and keyed by stream, on {target}, which {d.projection}"
        " also consumes."
    )
    lines = [
        ["replay-responder", "--bootstrap", s.kafka, "--schema", EVENT_SCHEMA],
        ["--requests-topic", s.requests_topic, "--target-topic", target],
        ["--group", s.responder_group],
        ["--exit-when-idle", "--idle-seconds", f"{IDLE_SECONDS:g}"],
    ]
    args = [a for line in lines for a in line]
    console.print(
        f"$ export PROJECTOR_RESPONDER_DSN='{redact(s.dsn)}'", style="bold", soft_wrap=True
    )
    shown = " \\\n      ".join(" ".join(line) for line in lines)
    shown = f"projector {shown} &"
    return Command(args, shown, who="responder", env={"PROJECTOR_RESPONDER_DSN": s.dsn})


def end_responder(responder: Command) -> None:
    """Let the responder exit by itself, once idle; stop it if it does not."""
    console.print(
        f"projector replay-responder: exits by itself {IDLE_SECONDS:g} s after its last request…"
    )
    try:
        code = responder.wait(IDLE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        console.print("[red]✗ the responder did not exit when idle: stopping it[/]")
        responder.stop()
        return
    console.print(f"projector replay-responder: exit code {code}")


def show_fill(
    s: Settings, daemon: Command, responder: Command, replayed: Sequence[Delivery]
) -> None:
    sent, served, published = replay_counts(daemon.lines, responder.lines)
    withheld = sum(len(d.withheld) for d in replayed)
    console.print(
        f"\nThe daemon sent {sent} replay requests for the {withheld} gaps (a gap is asked for"
        f" again until it fills); the responder served {served} and re-published {published}"
        f" events. projector applied each withheld event once, then the events parked behind"
        f" it; the {max(0, published - withheld)} repeats count among the duplicates above."
    )
    for d in replayed:
        gaps, parked = replay_state(s.dsn, d.projection)
        ok = not gaps and parked == 0
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        console.print(
            f"{mark} {d.projection}: the {len(d.withheld)} gaps were"
            f" {'filled through replay' if ok else 'NOT all filled'}: {len(gaps)} open,"
            f" {parked} events parked"
        )


def run_table(totals: Mapping[str, Mapping[str, int]], events: Mapping[str, int]) -> Table:
    columns = ("batches", "consumed", "applied", "duplicates", "parked", "dead_letters")
    out = Table("projection", "events", *(c.replace("_", " ") for c in columns))
    for name, counts in totals.items():
        out.add_row(name, str(events.get(name, "?")), *(str(counts.get(c, "?")) for c in columns))
    return out


def show_results(
    s: Settings,
    views: Mapping[str, View],
    case: SeedCase,
    in_redis: Mapping[str, View],
    school: Mapping[str, View],
    unenrolment: Unenrolment,
    business: Sequence[tuple[str, str]],
) -> bool:
    section("5. The views, compared row by row with the oracle")
    console.print("The oracles read each log in full and in order, the withheld events too.\n")
    ok = all([show_view(s.dsn, v) for v in views.values()])  # a list: show every view
    ok = show_seed_case(s.dsn, case, views) and ok
    ok = show_redis_games(s, in_redis, case) and ok
    ok = show_school(s.dsn, unenrolment, school) and ok
    ok = show_business(s, business, unenrolment) and ok
    section("6. projector's own state")
    return show_state(s) and ok


def what_next(s: Settings, config: Path, game: str) -> None:
    section("Try next")
    c = _shown(config)
    for comment, command in (
        (
            "what could not be applied, and why (nothing, here)",
            f"projector dead-letters list -c {c}",
        ),
        ("open gaps and their replay requests (none left, here)", f"projector gaps list -c {c}"),
        ("keep projecting while you publish more; Ctrl-C stops cleanly", f"projector run -c {c}"),
        ("the views themselves", f"psql '{redact(s.dsn)}' -c 'table games.games'"),
        (
            f"game {game}'s leaderboard in Redis",
            f"redis-cli -u '{redact(s.redis_url)}' ZRANGE"
            f" {redis_views(s)}game:{game}:leaderboard 0 {PODIUM - 1} REV WITHSCORES",
        ),
        ("all of this again, from scratch", "make demo"),
    ):
        console.print(f"  [dim]# {comment}[/]")
        console.print(f"  {'.venv/bin/' if command.startswith('projector') else ''}{command}")


def main() -> int:
    started = time.monotonic()
    s = settings_from(os.environ)
    rng = random.Random(SEED)
    projections = make_projections(rng)
    views = make_views({p.name: p.log for p in projections})
    games_log = next(p.log for p in projections if p.name == "games")
    in_redis = make_redis_views(games_log)
    case = find_seed_case(games_log)
    cdc_rng = random.Random(f"{SEED}/{SCHOOL}")  # its own: the other scenarios stay as they were
    cdc_log = cdc.school_log(cdc_rng, students=40, courses=8, changes=200)
    cdc_state = cdc.oracle(cdc_log)
    school = make_school_views(cdc_state)
    unenrolment = find_unenrolment(cdc_log, cdc_state)
    business = cdc.business_oracle(cdc_log, SCHOOL, name_business_events)
    introduce()
    config = set_up(s, projections)
    code = check_and_migrate(config)
    if code:
        return code
    deliveries = publish_all(s, rng, projections, case)
    cdc_deliveries = publish_cdc(s, cdc_rng, cdc_log, unenrolment)
    code = run_projector(s, config, deliveries, cdc_deliveries)
    if code:
        return code
    ok = show_results(s, views, case, in_redis, school, unenrolment, business)
    what_next(s, config, case.game_id)
    console.print()
    if ok:
        console.print(f"[green bold]Every view is right.[/] ({time.monotonic() - started:.1f} s)")
    else:
        console.print("[red bold]A view or projector's state is NOT what the events say.[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
