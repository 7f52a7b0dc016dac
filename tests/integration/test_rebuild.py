"""``projector rebuild`` on PostgreSQL, against real Kafka and PostgreSQL: the views are built
again beside the live ones and swapped in while the daemon runs and readers read."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient

from projector import scenarios
from projector.config import Config
from projector.runner.rebuild import HistoryTrimmed, rebuild
from projector.store.base import RebuildRunning
from projector.store.postgres import PostgresStore
from projector.store.postgres_rebuild import PgRebuildStore
from tests.conftest import ROOT, Services
from tests.integration.conftest import StoreUnderTest
from tests.integration.gaps_harness import FakeClock, running_daemon, wait_until
from tests.integration.harness import (
    make_config,
    migrate_all,
    process_config,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.test_pipeline import account_rows
from tests.integration.views import OwnState, RedisViews

pytestmark = pytest.mark.integration


@dataclass
class Reader:
    """Reads the live view in a loop, as a user would, and notes any moment it went back:
    empty after having rows, fewer rows, a smaller total of applied events, or a row at an
    older seq than seen before."""

    dsn: str
    reads: int = 0
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        seen_rows, seen_total = 0, 0
        last_seq: dict[str, int] = {}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                found = conn.execute(
                    "select id, last_seq, applied_events from accounts.accounts"
                ).fetchall()
                total = sum(r[2] for r in found)
                if seen_rows and not found:
                    self.violations.append("the view was empty")
                if len(found) < seen_rows or total < seen_total:
                    self.violations.append(f"went back: {len(found)} rows, {total} events")
                for account, seq, _ in found:
                    if seq < last_seq.get(account, 0):
                        self.violations.append(f"{account} went back to seq {seq}")
                    last_seq[account] = seq
                seen_rows, seen_total = max(seen_rows, len(found)), max(seen_total, total)
                self.reads += 1


@pytest.fixture
def reader(pg_dsn: str) -> Iterator[Reader]:
    """A reader, started by the test once the view exists."""
    r = Reader(pg_dsn)
    yield r
    r.stop.set()
    if r.thread is not None:
        r.thread.join(30)


def start_held(command: list[str], tmp_path: Path, after: int) -> subprocess.Popen[bytes]:
    """Start ``command`` with its handler held by the test gate once ``after`` events are
    handled (``tests/integration/gate.py``): it writes ``waiting`` in ``tmp_path`` then."""
    (tmp_path / "closed").touch()
    env = {**os.environ, "PROJECTOR_TEST_GATE": str(tmp_path)}
    env["PROJECTOR_TEST_GATE_AFTER"] = str(after)
    with (tmp_path / "first.log").open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def accounts(topic: str, **extra: Any) -> dict[str, Any]:
    return projection("accounts", [topic], ["handlers.accounts"], **extra)


def applied(pg_dsn: str) -> int:
    [(total,)] = rows(
        pg_dsn,
        "select coalesce(sum(next_offset), 0) from projector.checkpoints"
        " where projection = 'accounts'",
    )
    return int(total)


def schemas(pg_dsn: str) -> set[str]:
    return {r[0] for r in rows(pg_dsn, "select nspname from pg_namespace")}


@pytest.mark.parametrize(
    "streams", [250, pytest.param(2500, marks=pytest.mark.slow, id="50k")], ids=str
)
def test_rebuild_swaps_in_while_the_daemon_runs_and_readers_read(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    reader: Reader,
    streams: int,
) -> None:
    """Proves the rebuild's promise on 5,000 events (50,000 with ``-m slow``): with the
    daemon running and new events
    arriving during the rebuild, a reader querying the live view in a loop never sees it
    empty, shrink, lose applied events or step a row back; after the swap the daemon goes on
    from the rebuilt state, every event applied exactly once (the per-row counters equal the
    oracle's), nothing parked or dead-lettered, and no shadow or old schema is left."""
    rng = random.Random(8)
    log = scenarios.account_log(rng, accounts=streams, events_per_account=20)
    delivered = scenarios.shuffle_within_windows(rng, log, 50)
    first = len(delivered) * 3 // 5
    topic = new_topic(partitions=3)
    publish(services.kafka, topic, delivered[:first])
    config = make_config(services, pg_dsn, [accounts(topic, batch_max_messages=200)])
    migrate_all(config)
    with running_daemon(config, FakeClock()):
        wait_until(lambda: applied(pg_dsn) == first, "the daemon to apply the first part", 120)
        reader.start()
        done: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: done.update(report=rebuild(config, "accounts")))
        thread.start()
        step = len(delivered) // 12
        for start in range(first, len(delivered), step):
            publish(services.kafka, topic, delivered[start : start + step])
        thread.join(600)
        assert not thread.is_alive(), "the rebuild did not finish"
        assert done["report"].status == "swapped"
        wait_until(lambda: applied(pg_dsn) == len(delivered), "the daemon to apply the rest", 300)
        wait_until(lambda: account_rows(pg_dsn) == scenarios.accounts_oracle(log), "the oracle")
        reads_after = reader.reads + 20
        wait_until(lambda: reader.reads > reads_after, "the reader to read the swapped view")
    assert reader.violations == []
    assert reader.reads > 50
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.rebuilds") == [(0,)]
    assert {"accounts__rebuild", "accounts__old"} & schemas(pg_dsn) == set()
    print(f"reader: {reader.reads} reads, rebuild read {done['report'].read} messages")


def test_a_rebuild_killed_half_way_resumes_and_finishes(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves a rebuild killed with SIGKILL half-way is resumed, not started over, by the
    next ``projector rebuild``: the second run reads only what the first had not stored, shows
    its progress as lines (no terminal), and the swapped views equal the oracle."""
    rng = random.Random(9)
    log = scenarios.account_log(rng, accounts=250, events_per_account=20)
    topic = new_topic(partitions=2)
    publish(services.kafka, topic, scenarios.shuffle_within_windows(rng, log, 50))
    gated = projection(
        "accounts", [topic], ["tests.integration.gated_accounts"], batch_max_messages=20
    )
    path = process_config(services, pg_dsn, tmp_path, [gated])
    command = [sys.executable, "-m", "projector", "rebuild", "accounts", "-c", str(path)]
    first = start_held(command, tmp_path, after=1000)

    def rebuilt() -> int:
        [(total,)] = rows(
            pg_dsn,
            "select coalesce(sum(next_offset), 0) from projector.checkpoints"
            " where projection = 'accounts#rebuild'",
        )
        return int(total)

    wait_until((tmp_path / "waiting").exists, "the first rebuild to be held", 60)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    stored = rebuilt()
    assert 0 < stored < len(log), "killed half-way"

    second = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert second.returncode == 0, second.stdout + second.stderr
    read = int(second.stdout.split("read ")[1].split(" messages")[0].replace(",", ""))
    assert read <= len(log) - stored, second.stdout
    assert "swapped" in second.stdout
    assert "rebuild accounts: reading, " in second.stdout  # progress lines when not a terminal
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    print(f"killed at {stored} of {len(log)}; the second run read {read}")


def test_a_topic_that_lost_its_history_is_refused(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves the history check on both stores: once retention deleted the first records the
    projection was built from, rebuild refuses, naming the partition and what to do, and starts
    nothing; with --allow-trimmed-history it builds from what is left."""
    log = scenarios.customer_log(random.Random(3), 30)
    topic = new_topic()
    publish(store.services.kafka, topic, log)
    config = store.config([store.projection("people", [topic], ["customers"])])
    assert run_until_caught_up(config) == 0
    admin = AdminClient({"bootstrap.servers": store.services.kafka})
    for future in admin.delete_records([KafkaTopicPartition(topic, 0, 10)]).values():
        future.result(30)

    with pytest.raises(HistoryTrimmed, match=rf"{topic}\[0\] starts at 10, history at 0"):
        rebuild(config, "people")
    assert "people__rebuild" not in schemas(store.pg_dsn)
    planned = rebuild(config, "people", dry_run=True).plan  # a dry run shows it, unrefused
    assert [(p.topic, p.partition, p.low) for p in planned.trimmed] == [(topic, 0, 10)]

    report = rebuild(config, "people", allow_trimmed=True)
    assert report.status == "swapped" and report.read == len(log) - 10


def test_the_history_retention_removed_is_read_from_the_topic_named_for_it(
    store: StoreUnderTest, new_topic: Callable[..., str]
) -> None:
    """Proves ``--history-from`` on both stores: the source topic lost its first records, the
    whole history was re-published on an archive topic; the rebuild reads both (what is on
    both counts once), ends equal to the oracle of the whole log, and the daemon's checkpoints
    name only its own topic afterwards."""
    log = scenarios.customer_log(random.Random(6), 30)
    topic, archive = new_topic(), new_topic()
    publish(store.services.kafka, topic, log)
    config = store.config([store.projection("people", [topic], ["customers"])])
    assert run_until_caught_up(config) == 0
    admin = AdminClient({"bootstrap.servers": store.services.kafka})
    for future in admin.delete_records([KafkaTopicPartition(topic, 0, 25)]).values():
        future.result(30)
    publish(store.services.kafka, archive, log)

    report = rebuild(config, "people", history=[archive])

    assert report.status == "swapped" and report.read == 2 * len(log) - 25
    assert store.views.customers("people") == scenarios.customers_oracle(log)
    assert set(report.checkpoints) == {(topic, 0)}
    assert store.views.own("people") == OwnState(0, 0, 0, len(log))


def test_dry_run_changes_nothing_and_a_second_rebuild_is_refused(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves ``--dry-run`` only plans (what it would read; no shadow schema, no state), and
    that a rebuild of a projection whose rebuild is already running is refused, saying so."""
    log = scenarios.account_log(random.Random(4), accounts=10, events_per_account=5)
    topic = new_topic()
    publish(services.kafka, topic, log)
    config = make_config(services, pg_dsn, [accounts(topic)])
    migrate_all(config)

    report = rebuild(config, "accounts", dry_run=True)
    assert report.status == "planned" and report.plan.to_read == len(log)
    assert "accounts__rebuild" not in schemas(pg_dsn)
    assert rows(pg_dsn, "select count(*) from projector.rebuilds") == [(0,)]

    store = PostgresStore(pg_dsn)
    try:
        running = pytest.raises(RebuildRunning, match="another rebuild of accounts is running")
        with PgRebuildStore(store, "accounts", "accounts").exclusive(), running:
            rebuild(config, "accounts")
    finally:
        store.close()


def test_grants_and_dependent_views_follow_the_swap(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves what users built on the live views survives the swap: a role's grants on the
    schema and table are given on the new ones, and a view in another schema over the table
    reads the rebuilt table afterwards (and is not dropped with the old one)."""
    log = scenarios.account_log(random.Random(5), accounts=10, events_per_account=5)
    topic = new_topic()
    publish(services.kafka, topic, log)
    config: Config = make_config(services, pg_dsn, [accounts(topic)])
    migrate_all(config)
    assert run_until_caught_up(config) == 0
    role = f"reader_{random.randrange(10**9)}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"create role {role}")
        conn.execute(f"grant usage on schema accounts to {role}")
        conn.execute(f"grant select on accounts.accounts to {role}")
        conn.execute("create schema reports")
        conn.execute(
            "create view reports.rich as select id from accounts.accounts where balance > 0"
        )
    try:
        assert rebuild(config, "accounts").status == "swapped"
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            privileges = conn.execute(
                "select has_schema_privilege(%s, 'accounts', 'usage'),"
                " has_table_privilege(%s, 'accounts.accounts', 'select')",
                (role, role),
            ).fetchone()
            assert privileges == (True, True)
            rich = {r[0] for r in conn.execute("select id from reports.rich").fetchall()}
            expected = {a for a, r in scenarios.accounts_oracle(log).items() if r["balance"] > 0}
            assert rich == expected
            depends = conn.execute(
                "select distinct t.relnamespace::regnamespace::text from pg_depend d"
                " join pg_rewrite r on r.oid = d.objid join pg_class t on t.oid = d.refobjid"
                " where r.ev_class = 'reports.rich'::regclass and t.relkind = 'r'"
            ).fetchall()
            assert depends == [("accounts",)]
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("drop schema if exists reports cascade")
            conn.execute(f"drop owned by {role}")
            conn.execute(f"drop role {role}")


@dataclass
class RedisReader:
    """Reads the live game views in Redis in a loop, as a user would (the active version's
    pointer, then its keys), and notes any moment they went back: fewer games, fewer plays in
    total, or a game at an older seq than seen before."""

    url: str
    prefix: str
    reads: int = 0
    versions: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        seen_games, seen_plays = 0, 0
        last_seq: dict[str, int] = {}
        with redis.Redis.from_url(self.url, decode_responses=True) as client:
            while not self.stop.is_set():
                active = client.get(f"{self.prefix}:v:games:active")
                if active is None:
                    continue
                self.versions.add(active)
                ns = f"{self.prefix}:v:games:{active}:game:"
                keys = [k for k in client.scan_iter(match=f"{ns}*") if ":" not in k[len(ns) :]]
                games = {k[len(ns) :]: client.hmget(k, "plays", "last_seq") for k in keys}
                plays = sum(int(p or 0) for p, _ in games.values())
                if len(games) < seen_games or plays < seen_plays:
                    self.violations.append(f"went back: {len(games)} games, {plays} plays")
                for game, (_, seq) in games.items():
                    if int(seq or 0) < last_seq.get(game, 0):
                        self.violations.append(f"game {game} went back to seq {seq}")
                    last_seq[game] = int(seq or 0)
                seen_games, seen_plays = max(seen_games, len(games)), max(seen_plays, plays)
                self.reads += 1


@pytest.mark.parametrize("plays", [250, pytest.param(2500, marks=pytest.mark.slow, id="50k")])
def test_redis_rebuild_flips_to_a_new_version_while_the_daemon_runs_and_readers_read(
    services: Services,
    redis_prefix: str,
    new_topic: Callable[..., str],
    pg_dsn: str,
    plays: int,
) -> None:
    """Proves the rebuild on Redis with 5,000 plays of 20 games: a new key version is built
    beside the live one while the daemon applies and new plays arrive; a reader that follows
    the active-version pointer never sees fewer games, fewer plays or an older seq; after the
    flip the daemon goes on in the new version, every play applied once (the box scores and
    leaderboards equal the oracle), and the old version's keys are set to expire. (50,000
    plays with ``-m slow``.)"""
    rng = random.Random(12)
    log = scenarios.game_log(rng, 20, plays)
    delivered = scenarios.shuffle_within_windows(rng, log, 50)
    first = len(delivered) * 3 // 5
    topic = new_topic(partitions=3)
    publish(services.kafka, topic, delivered[:first])
    games = projection("games", [topic], ["handlers.game_redis"], store="redis")
    config = make_config(services, pg_dsn, [{**games, "batch_max_messages": 200}], redis_prefix)
    views = RedisViews(services.redis_url, redis_prefix)
    reader = RedisReader(services.redis_url, redis_prefix)
    with running_daemon(config, FakeClock()):
        wait_until(lambda: views.own("games").checkpoint_sum == first, "the first part", 120)
        reader.start()
        done: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: done.update(report=rebuild(config, "games")))
        thread.start()
        step = len(delivered) // 12
        for start in range(first, len(delivered), step):
            publish(services.kafka, topic, delivered[start : start + step])
        thread.join(300)
        assert not thread.is_alive(), "the rebuild did not finish"
        assert done["report"].status == "swapped"
        wait_until(lambda: views.own("games").checkpoint_sum == len(delivered), "the rest", 120)
        wait_until(lambda: views.games("games") == scenarios.game_oracle(log), "the oracle")
        reads_after = reader.reads + 10
        wait_until(lambda: reader.reads > reads_after, "the reader to read the new version")
        reader.stop.set()
    assert reader.thread is not None
    reader.thread.join(30)
    assert reader.violations == []
    assert reader.versions == {"1", "2"}
    assert views.own("games") == OwnState(0, 0, 0, len(delivered))
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as client:
        old = list(client.scan_iter(match=f"{redis_prefix}:v:games:1:*"))
        assert old and all(0 < client.pttl(k) <= 60_000 for k in old)
        assert not list(client.scan_iter(match=f"{redis_prefix}:s:games#rebuild:*"))
    print(f"reader: {reader.reads} reads, rebuild read {done['report'].read} messages")


def test_a_redis_rebuild_killed_half_way_resumes_and_a_second_one_is_refused(
    services: Services, redis_prefix: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves on Redis: while a rebuild runs, a second one is refused (its lock is a key with
    a lease); a rebuild killed with SIGKILL half-way resumes from its stored offsets when
    started again, and after the flip the views equal the oracle."""
    log = scenarios.game_log(random.Random(13), 20, 250)
    topic = new_topic(partitions=2)
    publish(services.kafka, topic, log)
    games = projection("games", [topic], ["tests.integration.gated_game_redis"], store="redis")
    path = process_config(
        services, services.pg_dsn, tmp_path, [{**games, "batch_max_messages": 20}], redis_prefix
    )
    command = [sys.executable, "-m", "projector", "rebuild", "games", "-c", str(path)]
    first = start_held(command, tmp_path, after=1000)
    offsets = f"{redis_prefix}:s:games#rebuild:offsets"
    with redis.Redis.from_url(services.redis_url, decode_responses=True) as client:

        def rebuilt() -> int:
            return sum(int(v) for v in client.hvals(offsets))

        wait_until((tmp_path / "waiting").exists, "the first rebuild held", 60)
        refused = subprocess.run(
            command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        stored = rebuilt()
        client.delete(f"{redis_prefix}:s:games:rebuilding")  # the dead one's lease, cut short
    assert refused.returncode == 1 and "another rebuild of games is running" in refused.stderr
    assert 0 < stored < len(log), "killed half-way"

    second = subprocess.run(
        command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert second.returncode == 0, second.stdout + second.stderr
    read = int(second.stdout.split("read ")[1].split(" messages")[0].replace(",", ""))
    assert read <= len(log) - stored, second.stdout
    views = RedisViews(services.redis_url, redis_prefix)
    assert views.games("games") == scenarios.game_oracle(log)
    print(f"killed at {stored} of {len(log)}; the second run read {read}")
