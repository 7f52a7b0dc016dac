"""Faults of the services under a running daemon (a real ``projector run`` process): PostgreSQL
restarted in ``immediate`` mode (a private cluster, so no other test is disturbed), the daemon's
PostgreSQL sessions terminated mid-batch, a connection cut after its commit reached the server
and before the answer came back (a TCP proxy; PostgreSQL and Redis), and the Kafka broker
killed and restarted (a private broker). The daemon must recover by itself, without a restart; every run ends with
every stream equal to the oracle folded from the complete ordered log, the per-row apply
counters showing nothing applied twice, and nothing left parked.

Run with ``.venv/bin/pytest -m fault -s tests/integration/test_fault_services.py``; each
scenario prints its figures on a line starting with ``FIGURES``. ``PROJECTOR_FAULT_SEED``
changes the seed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projector.config import parse_config
from tests.conftest import Services, unique
from tests.integration.fault_run import (
    LANDED_UNANSWERED,
    TRANSIENT,
    Daemon,
    PgState,
    Workload,
    compare_shop,
    daemon,
    daemon_sessions,
    figures,
    pg_state,
    recoveries,
    shop_workload,
    source_committed,
    terminate_daemon_sessions,
    wait_for,
)
from tests.integration.harness import config_dict, migrate_all, projection, publish, write_config
from tests.integration.kafka_server import KafkaServer
from tests.integration.pg_server import PgServer
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.views import OwnState, PgViews, RedisViews, Views

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SEED = int(os.environ.get("PROJECTOR_FAULT_SEED", "1125"))
SHOP = ["handlers.customers", "handlers.game"]
REDIS_SHOP = ["handlers.customers_redis", "handlers.game_redis"]
PARTITIONS = 4


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[PgServer]:
    """A private PostgreSQL cluster, stopped and removed afterwards."""
    server = PgServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def kafka_server(services: Services, tmp_path: Path) -> Iterator[KafkaServer]:
    """A private Kafka broker (the shared services first: they resolve the jars), killed
    afterwards."""
    server = KafkaServer(tmp_path / "kafka")
    try:
        server.start()
        yield server
    finally:
        server.close()


def shop_config(
    services: Services,
    dsn: str,
    topic: str,
    tmp_path: Path,
    kind: str = "postgres",
    prefix: str | None = None,
    **extra: Any,
) -> tuple[Path, dict[str, Any]]:
    """A config file for the shop projection on ``topic``, in PostgreSQL (``dsn``, migrated)
    or in Redis (``services.redis_url``, keys under ``prefix``; no postgres section)."""
    consumer = extra.pop("consumer", {})
    handlers = SHOP if kind == "postgres" else REDIS_SHOP
    shop = projection("shop", [topic], handlers, store=kind, **{"batch_max_messages": 100, **extra})
    data = config_dict(services, dsn, [shop], prefix)
    data["kafka"]["consumer"].update(consumer)
    if kind == "postgres":
        migrate_all(parse_config(data, env={}))
    else:
        del data["postgres"]
    return write_config(tmp_path / "config.yaml", data), data


@dataclass
class PgTarget:
    """The daemon's store, PostgreSQL: what the test reads of it."""

    dsn: str
    topic: str
    total: int  # messages on the source topic

    @property
    def views(self) -> Views:
        return PgViews(self.dsn)

    def committed(self) -> int | None:
        """The source checkpoints' sum, or None while the server can't be reached."""
        try:
            return source_committed(self.dsn, "shop", self.topic)
        except psycopg.OperationalError:
            return None

    def done(self) -> bool:
        """Everything consumed; the holding table empty; no gap, no dead letter."""
        return pg_state(self.dsn, "shop", self.topic) == PgState(0, 0, 0, self.total)


@dataclass
class RedisTarget:
    """The daemon's store, Redis (keys under ``prefix``)."""

    url: str
    prefix: str
    topic: str
    total: int

    @property
    def views(self) -> Views:
        return RedisViews(self.url, self.prefix)

    def committed(self) -> int | None:
        with redis.Redis.from_url(self.url, decode_responses=True) as client:
            offsets = cast(dict[str, str], client.hgetall(f"{self.prefix}:s:shop:offsets"))
        return sum(int(v) for k, v in offsets.items() if k.rpartition(":")[0] == self.topic)

    def done(self) -> bool:
        parked = self.views.parked_count("shop")
        return parked == 0 and self.views.own("shop") == OwnState(0, 0, 0, self.total)


Target = PgTarget | RedisTarget


def wait_committed(d: Daemon, target: Target, goal: int, limit: float = 180) -> int:
    """Poll until at least ``goal`` source messages are committed; how many are."""
    return int(
        wait_for(
            lambda: (n := target.committed()) is not None and n >= goal and n,
            f"{goal} committed",
            limit,
            d.check_alive,
            every=0.02,
        )
    )


def time_to_progress(d: Daemon, target: Target, since: float, limit: float = 120) -> float:
    """Seconds from ``since`` (monotonic) until the daemon commits more than it had then."""
    before = target.committed()
    assert before is not None
    wait_committed(d, target, before + 1, limit)
    return time.monotonic() - since


def finish(d: Daemon, target: Target, work: Workload, applied_known: bool = True) -> dict[str, Any]:
    """Wait (bounded) for the end: everything consumed, nothing parked, no gap, no dead
    letter; stop the daemon (SIGTERM, exit 0); compare every stream with the oracles and,
    when every commit's outcome reached it (``applied_known``), the daemon's own count of
    applied events (logged when it stops) with the log's length."""
    wait_for(target.done, "all consumed, nothing parked, no gap", 240, d.check_alive)
    assert d.stop() == 0, d.tail()
    compared = compare_shop(target.views, "shop", work.log)
    totals = d.totals("shop")
    assert compared.all_equal, compared.examples
    assert compared.applied_twice == 0
    if applied_known:
        assert totals.get("applied") == len(work.log), totals
    else:  # a batch whose commit answer was lost is retried: its events count as duplicates
        assert totals.get("applied", 0) <= len(work.log), totals
    return {
        "events": len(work.log),
        "delivered": len(work.delivered),
        "streams": compared.streams,
        "streams_equal_pct": compared.percent_equal,
        "applied_twice": compared.applied_twice,
        "applied_by_daemon": totals.get("applied"),
        "duplicates_counted": totals.get("duplicates"),
        "holding_at_end": target.views.own("shop").parked,
    }


# ------------------------------------------------------------------- PostgreSQL restarted


RESTARTS = 3


@pytest.mark.timeout(600)
def test_postgres_restarted_in_immediate_mode_mid_run(
    services: Services, pg_server: PgServer, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves the daemon rides out a PostgreSQL crash by itself: a private cluster is stopped
    in ``immediate`` mode (every backend killed, no checkpoint: crash recovery at the next
    start), three times, each time as soon as the daemon has a transaction open (a batch in
    flight), while the daemon applies 30,000 reordered, 1%-duplicated customer and game
    events in batches of 100. It stays down until the daemon has logged two failed retries
    (the outage was seen: connections refused), then starts again on the same port and data.
    The daemon does not exit; it reconnects, resumes, and ends with every stream equal to the
    oracle, nothing applied twice (the views' own counts), nothing parked, every checkpoint at
    its partition's end. (The daemon's count of applied events may fall short: a stop that
    lands after a commit reached the disk but before its answer reached the daemon makes it
    retry that batch, whose events it then counts as duplicates: 100 short, once.) Figures:
    the restarts, how long each was down, retries logged, seconds from the server accepting
    connections again to the daemon's next commit."""
    seed = SEED + 10
    work = shop_workload(seed, customers=2800, games=220, duplicates=0.01)
    total = len(work.delivered)
    topic = new_topic(partitions=PARTITIONS)
    publish(services.kafka, topic, work.delivered)
    dsn = pg_server.create_database(unique("t"))
    path, _ = shop_config(services, dsn, topic, tmp_path)
    target = PgTarget(dsn, topic, total)

    down: list[float] = []
    resume: list[float] = []
    at_restart: list[int] = []
    with daemon(path, tmp_path / "daemon.log") as d:
        d.start()
        for n in range(1, RESTARTS + 1):
            at_restart.append(wait_committed(d, target, total * n // (RESTARTS + 2)))
            wait_for(
                lambda: any(s.in_transaction for s in daemon_sessions(dsn)),
                "a transaction of the daemon open",
                60,
                d.check_alive,
                every=0.005,
            )
            since = d.size()
            began = time.monotonic()
            pg_server.stop("immediate")
            wait_for(
                lambda: d.text()[since:].count(TRANSIENT) >= 2,  # noqa: B023
                "the daemon to retry against the stopped server",
                60,
                d.check_alive,
            )
            pg_server.start()
            back = time.monotonic()
            down.append(back - began)
            resume.append(time_to_progress(d, target, back))
        text = d.text()
        retries = text.count(TRANSIENT)
        end = finish(d, target, work, applied_known=False)
    figures(
        "pg-restart",
        {
            "seed": seed,
            **end,
            "restarts": RESTARTS,
            "committed_at_restarts": at_restart,
            "down_seconds": [round(s, 2) for s in down],
            "retries_logged": retries,
            "resume_seconds": [round(s, 2) for s in resume],
        },
    )
    assert all(n < total for n in at_restart), "a restart came after the end"
    assert retries >= 2 * RESTARTS, text[-4000:]


# ------------------------------------------------------------------- sessions terminated


TERMINATIONS = 6


@pytest.mark.timeout(600)
def test_daemon_sessions_terminated_mid_batch(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves the daemon recovers by itself when its PostgreSQL sessions are ended under it:
    six times during a run of 30,000 reordered, 1%-duplicated events, as soon as one of its
    sessions has a transaction open (a batch in flight), ``pg_terminate_backend`` ends it.
    The batch rolls back (or, ended with its COMMIT in flight, may have committed: the daemon
    then finds it in the store); the daemon retries on a new connection and resumes; the run ends
    with every stream equal to the oracle and nothing applied twice or parked. Figures: the
    terminations (all mid-transaction), the retries logged, seconds from each termination
    to the daemon's next commit."""
    seed = SEED + 20
    work = shop_workload(seed, customers=2800, games=220, duplicates=0.01)
    total = len(work.delivered)
    topic = new_topic(partitions=PARTITIONS)
    publish(services.kafka, topic, work.delivered)
    path, _ = shop_config(services, pg_dsn, topic, tmp_path)
    target = PgTarget(pg_dsn, topic, total)

    ended: list[int] = []
    resume: list[float] = []
    at_kill: list[int] = []
    with daemon(path, tmp_path / "daemon.log") as d:
        d.start()
        for n in range(1, TERMINATIONS + 1):
            wait_committed(d, target, total * n // (TERMINATIONS + 2))
            # Poll until a session of the daemon is inside a transaction, and end it then.
            ended.append(
                wait_for(
                    lambda: terminate_daemon_sessions(pg_dsn, mid_transaction=True),
                    "a daemon session inside a transaction",
                    60,
                    d.check_alive,
                    every=0.005,
                )
            )
            at = time.monotonic()
            at_kill.append(source_committed(pg_dsn, "shop", topic))
            resume.append(time_to_progress(d, target, at))
        text = d.text()
        retries = recoveries(text)
        end = finish(d, target, work)
    figures(
        "pg-terminate",
        {
            "seed": seed,
            **end,
            "terminations": len(ended),
            "sessions_ended_mid_transaction": sum(ended),
            "committed_at_terminations": at_kill,
            "retries_logged": retries,
            "resume_seconds": [round(s, 2) for s in resume],
        },
    )
    assert all(n < total for n in at_kill), "a termination came after the end"
    assert retries >= TERMINATIONS, text[-4000:]


# ------------------------------------------------------------------- COMMIT answer lost


CUTS = 5


def via_proxy(dsn: str, proxy: TcpProxy) -> str:
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_connection_cut_after_commit_sent_before_its_answer(
    kind: str,
    services: Services,
    pg_dsn: str,
    redis_prefix: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Proves a batch whose commit outcome the daemon can't know is not applied twice, on
    each store: the daemon reaches its store through a TCP proxy which, armed five times
    during a run of 30,000 reordered, 1%-duplicated events, lets a batch's commit through to
    the server (PostgreSQL: its COMMIT; Redis: the MULTI / EVALSHA / EXEC of its script),
    takes the server's answer itself (the server did commit: PostgreSQL's CommandComplete
    says COMMIT, Redis's EXEC answers the script's result) and closes both connections. The
    daemon sees a lost connection and must find the batch applied. On both stores the commit
    was in flight (pipelined): the daemon reads the stored checkpoints, finds the batch there
    and counts it once, so its totals show every event applied and none seen again. The run
    ends with every stream equal to the oracle and the per-row apply counters showing nothing
    applied twice."""
    seed = SEED + (30 if kind == "postgres" else 35)
    work = shop_workload(seed, customers=2800, games=220, duplicates=0.01)
    total = len(work.delivered)
    topic = new_topic(partitions=PARTITIONS)
    publish(services.kafka, topic, work.delivered)
    target: Target
    if kind == "postgres":
        upstream = conninfo_to_dict(pg_dsn)
        host, port = str(upstream.get("host") or "127.0.0.1"), int(upstream.get("port") or 5432)
        target = PgTarget(pg_dsn, topic, total)
    else:
        url = urlsplit(services.redis_url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        target = RedisTarget(services.redis_url, redis_prefix, topic, total)
    # The topic's name goes with a batch's checkpoint update (and not with the daemon's other
    # transactions): only batch commits are cut.
    proxy = TcpProxy(host, port, marker=topic.encode(), protocol=kind)
    try:
        path, data = shop_config(services, pg_dsn, topic, tmp_path, kind, redis_prefix)
        if kind == "postgres":
            data["postgres"]["dsn"] = via_proxy(pg_dsn, proxy)
        else:
            data["redis"]["url"] = urlunsplit(url._replace(netloc=f"127.0.0.1:{proxy.port}"))
        write_config(path, data)
        resume: list[float] = []
        with daemon(path, tmp_path / "daemon.log") as d:
            d.start()
            for n in range(1, CUTS + 1):
                wait_committed(d, target, total * n // (CUTS + 2))
                proxy.arm()
                wait_for(lambda: len(proxy.cuts) >= n, f"cut {n}", 60, d.check_alive)  # noqa: B023
                resume.append(time_to_progress(d, target, proxy.cuts[-1].at))
            text = d.text()
            retries = recoveries(text)
            found_committed = text.count(LANDED_UNANSWERED)
            end = finish(d, target, work, applied_known=False)
    finally:
        proxy.close()
    outcomes = [c.outcome for c in proxy.cuts]
    extra_duplicates = end["duplicates_counted"] - work.duplicates
    figures(
        f"commit-reply-lost[{kind}]",
        {
            "seed": seed,
            **end,
            "cuts": len(outcomes),
            "server_answered": outcomes,
            "recoveries_logged": retries,
            "found_committed": found_committed,
            "duplicates_delivered": work.duplicates,
            "seen_again_after_cuts": extra_duplicates,
            "resume_seconds": [round(s, 2) for s in resume],
        },
    )
    committed = "COMMIT" if kind == "postgres" else "EXEC"
    assert outcomes == [committed] * CUTS, "the server did not commit every cut transaction"
    assert retries >= CUTS, text[-4000:]
    # Each cut batch found in the store and counted once: every event applied, none seen again.
    assert found_committed == CUTS, text[-4000:]
    assert (end["applied_by_daemon"], extra_duplicates) == (len(work.log), 0)


# ------------------------------------------------------------------- Kafka restarted


KAFKA_DOWN = re.compile(r"Disconnected|Connect to \S+ failed")
REVOKED = "projector.source.kafka: revoked topic_"


def create_topic(bootstrap: str, partitions: int) -> str:
    topic = unique("topic")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30)[topic].result(60)
    return topic


@pytest.mark.timeout(600)
def test_kafka_broker_killed_and_restarted_mid_run(
    services: Services, pg_dsn: str, kafka_server: KafkaServer, tmp_path: Path
) -> None:
    """Proves the daemon rides out a Kafka broker crash by itself: a private single-node
    broker (KRaft) is killed with -9 while the daemon applies 30,000 reordered, 1%-duplicated
    events (its local prefetch kept small), and stays down until the daemon's group session
    timed out and it revoked its partitions (what it had fetched is then out of play); then
    it is started again on the same ports and data. The daemon does not exit; it rejoins,
    gets its partitions back, applies again, catches up, and ends with every stream equal to
    the oracle, nothing applied twice, nothing parked, and the run short of its end when the
    broker came back. Figure: seconds from the broker being back (started and listening, seen
    within 50 ms) to the daemon applying again."""
    seed = SEED + 40
    work = shop_workload(seed, customers=2800, games=220, duplicates=0.01)
    total = len(work.delivered)
    private = Services(kafka_server.bootstrap, services.pg_dsn, services.redis_url)
    topic = create_topic(kafka_server.bootstrap, PARTITIONS)
    publish(kafka_server.bootstrap, topic, work.delivered)
    small_prefetch = {"queued.min.messages": 500, "queued.max.messages.kbytes": 256}
    path, _ = shop_config(private, pg_dsn, topic, tmp_path, consumer=small_prefetch)
    target = PgTarget(pg_dsn, topic, total)

    with daemon(path, tmp_path / "daemon.log") as d:
        d.start()
        at_kill = wait_committed(d, target, total // 3)
        kafka_server.kill()
        killed = time.monotonic()
        # Down until the daemon has noticed (its Kafka client logs the lost connection) and
        # its group session timed out (it revoked its partitions): whatever it had fetched
        # before is then out of play, and applying again needs the broker back.
        since = d.size()
        wait_for(
            lambda: KAFKA_DOWN.search(d.text()[since:]) and REVOKED in d.text()[since:],
            "the daemon to see Kafka down and revoke its partitions",
            120,
            d.check_alive,
        )
        restart_seconds = kafka_server.start()
        back = time.monotonic()
        at_back = source_committed(pg_dsn, "shop", topic)
        applying_again = time_to_progress(d, target, back, limit=180)
        text = d.text()
        end = finish(d, target, work)
    down_lines = len(KAFKA_DOWN.findall(text[since:]))
    figures(
        "kafka-restart",
        {
            "seed": seed,
            **end,
            "committed_at_kill": at_kill,
            "committed_when_back": at_back,
            "broker_down_seconds": round(back - killed, 1),
            "broker_start_seconds": round(restart_seconds, 1),
            "kafka_down_lines_logged": down_lines,
            "reassignments": text.count("projector.source.kafka: assigned") - 1,
            "seconds_back_to_applying": round(applying_again, 2),
        },
    )
    assert at_back < total, "the daemon had everything before the broker came back"
