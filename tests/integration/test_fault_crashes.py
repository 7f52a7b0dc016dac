"""Crash anywhere: ``projector run`` as a real process, killed with -9 twenty times at random
moments of a 50k-event run and restarted each time, on PostgreSQL and on Redis. The run ends
with every stream equal to the oracle folded from the complete ordered log, nothing applied
twice, every event that was parked at a kill applied, and nothing left parked.

At each kill the daemon is first frozen (SIGSTOP) so that what the store holds for it can be
read as it is at the kill: whether it had work in the store not yet committed (PostgreSQL: one
of its sessions had a transaction open, ``xact_start is not null``, once the server finished
what it had been sent; Redis: one of its connections had begun a batch under WATCH and not
sent its EXEC), and which events were parked. Then SIGKILL.

Run with ``.venv/bin/pytest -m fault -s tests/integration/test_fault_crashes.py``; the figures
are printed on a line starting with ``FIGURES``. ``PROJECTOR_FAULT_SEED`` changes the seed.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import psycopg
import pytest
import redis

from projector.config import parse_config
from tests.conftest import Services, unique
from tests.integration.fault_run import (
    Daemon,
    Session,
    compare_shop,
    daemon,
    daemon_sessions,
    figures,
    replay_responder,
    shop_workload,
    wait_for,
)
from tests.integration.harness import (
    config_dict,
    migrate_all,
    projection,
    publish,
    write_config,
)
from tests.integration.redis_server import AOF, RedisServer, RedisServers
from tests.integration.views import PgViews, RedisViews, Views

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SEED = int(os.environ.get("PROJECTOR_FAULT_SEED", "1125"))
KILLS = 20
Parked = set[tuple[str, int]]


@dataclass(frozen=True)
class EndState:
    parked: int
    open_gaps: int
    dead_letters: int
    source_committed: int


class StoreProbe(Protocol):
    """What a test can read of projector's state in one store, from outside the daemon."""

    views: Views
    seen: Counter[str]  # the daemon's sessions (connections) at the kills, by what they showed

    def committed(self) -> int:
        """Messages of the source topic consumed (its stored checkpoints' sum)."""

    def uncommitted_work(self) -> bool:
        """With the daemon frozen: did it have work in the store not yet committed?"""

    def parked(self) -> Parked:
        """The (stream, seq) of every parked event, as committed."""

    def positions(self) -> dict[str, int]:
        """Every stream's last applied seq, as committed."""

    def end_state(self) -> EndState: ...

    def close(self) -> None: ...


SETTLE = 10.0  # seconds for the server to finish what a frozen client had already sent


@dataclass
class PgProbe:
    dsn: str
    topic: str
    projection: str = "shop"
    views: Views = field(init=False)
    seen: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.views = PgViews(self.dsn)

    def _rows(self, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, connect_timeout=10) as conn:
            return conn.execute(query, {"p": self.projection, "t": self.topic}).fetchall()

    def committed(self) -> int:
        [(n,)] = self._rows(
            "select coalesce(sum(next_offset), 0) from projector.checkpoints"
            " where projection = %(p)s and topic = %(t)s"
        )
        return int(n)

    def uncommitted_work(self) -> bool:
        # A frozen client sends nothing more; once none of its sessions is running a
        # statement, an open transaction is one the kill will roll back.
        def settled() -> tuple[list[Session]] | None:
            found = daemon_sessions(self.dsn)
            return (found,) if all(s.waiting_on_client for s in found) else None

        (sessions,) = wait_for(
            settled, "the frozen daemon's sessions to settle", SETTLE, every=0.05
        )
        self.seen.update(
            s.state + (f" ({s.wait_event})" if s.state == "active" else "") for s in sessions
        )
        return any(s.in_transaction for s in sessions)

    def parked(self) -> Parked:
        found = self._rows("select stream, seq from projector.holding where projection = %(p)s")
        return {(str(s), int(q)) for s, q in found}

    def positions(self) -> dict[str, int]:
        found = self._rows(
            "select stream, last_seq from projector.positions where projection = %(p)s"
        )
        return {str(s): int(q) for s, q in found}

    def end_state(self) -> EndState:
        [(holding, gaps, letters)] = self._rows(
            "select (select count(*) from projector.holding),"
            " (select count(*) from projector.gaps where projection = %(p)s"
            "  and state <> 'skipped'),"
            " (select count(*) from projector.dead_letters where projection = %(p)s"
            "  and status = 'open')"
        )
        return EndState(int(holding), int(gaps), int(letters), self.committed())

    def close(self) -> None:
        pass


class RedisMonitor:
    """Follows a private redis-server's MONITOR feed in a thread and keeps, per client
    connection, whether it has a WATCH open: a WATCH not yet ended by EXEC, DISCARD or
    UNWATCH, i.e. a transaction begun (its reads done) whose EXEC was not sent."""

    def __init__(self, server: RedisServer):
        self._client = server.client(decode_responses=True)
        self._lock = threading.Lock()
        self._watching: dict[str, bool] = {}
        self._markers: set[str] = set()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor")
        self._thread.start()
        assert self._ready.wait(30), "MONITOR did not start"

    def _run(self) -> None:
        with self._client.monitor() as feed:
            self._ready.set()
            while not self._stop.is_set():
                item = feed.next_command()
                if item.get("client_type") == "lua":
                    continue  # what a script runs: not a client's command
                words = str(item["command"]).split(" ", 1)
                name, who = words[0].lower(), f"{item['client_address']}:{item['client_port']}"
                with self._lock:
                    if name == "watch":
                        self._watching[who] = True
                    elif name in ("exec", "discard", "unwatch"):
                        self._watching[who] = False
                    elif name == "echo":
                        self._markers.add(words[1].strip('"') if len(words) > 1 else "")

    def sync(self, client: redis.Redis) -> None:
        """Return once the feed has passed everything the server ran before now (an ECHO
        sent now comes after it in the feed)."""
        marker = unique("marker")
        client.echo(marker)
        wait_for(lambda: self._seen(marker), "the MONITOR feed to catch up", SETTLE, every=0.02)

    def _seen(self, marker: str) -> bool:
        with self._lock:
            return marker in self._markers

    def watching(self, addresses: set[str]) -> bool:
        """Whether any of these connections (``ip:port``) has a WATCH open."""
        with self._lock:
            return any(self._watching.get(a, False) for a in addresses)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._client.echo("stop")  # wakes the feed up so that it sees the stop
        self._thread.join(30)


@dataclass
class RedisProbe:
    server: RedisServer
    prefix: str
    topic: str
    projection: str = "shop"
    views: Views = field(init=False)
    seen: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.views = RedisViews(self.server.url, self.prefix)
        self.client = self.server.client(decode_responses=True)
        self.monitor = RedisMonitor(self.server)

    def _base(self) -> str:
        version = cast(str | None, self.client.get(f"{self.prefix}:s:{self.projection}:version"))
        version = version or "1"
        return f"{self.prefix}:s:{self.projection}:{version}"

    def committed(self) -> int:
        key = f"{self.prefix}:s:{self.projection}:offsets"
        offsets = cast(dict[str, str], self.client.hgetall(key))
        return sum(int(v) for k, v in offsets.items() if k.rpartition(":")[0] == self.topic)

    def uncommitted_work(self) -> bool:
        """A connection of the daemon with a WATCH open (see ``RedisMonitor``), once the
        server has run whatever the frozen daemon had sent. The server is private: every
        client but this probe's and the monitor's is the daemon's."""
        me = self.client.client_id()

        def settled() -> tuple[list[dict[str, Any]]] | None:
            found = [
                c
                for c in self.client.client_list()
                if int(c["id"]) != me and "O" not in c["flags"]  # O: the MONITOR connection
            ]
            return None if any(int(c["qbuf"]) for c in found) else (found,)

        (clients,) = wait_for(settled, "the frozen daemon's commands to run", SETTLE, every=0.05)
        self.monitor.sync(self.client)
        watching = [self.monitor.watching({c["addr"]}) for c in clients]
        self.seen.update("WATCH open" if w else "no WATCH open" for w in watching)
        return any(watching)

    def _stream_hashes(self) -> Iterator[tuple[str, dict[str, str]]]:
        base = f"{self._base()}:st:"
        for key in self.client.scan_iter(match=base + "*", count=1000):
            yield str(key).removeprefix(base), cast(dict[str, str], self.client.hgetall(key))

    def parked(self) -> Parked:
        return {
            (stream, int(f.removeprefix("p:")))
            for stream, fields in self._stream_hashes()
            for f in fields
            if f.startswith("p:")
        }

    def positions(self) -> dict[str, int]:
        return {s: int(h["seq"]) for s, h in self._stream_hashes() if "seq" in h}

    def end_state(self) -> EndState:
        own = self.views.own(self.projection)
        parked = max(own.parked, self.views.parked_count(self.projection))
        return EndState(parked, own.open_gaps, own.dead_letters, self.committed())

    def close(self) -> None:
        self.monitor.close()


HANDLERS = {
    "postgres": ["handlers.customers", "handlers.game"],
    "redis": ["handlers.customers_redis", "handlers.game_redis"],
}


def store_config(
    kind: str,
    services: Services,
    pg_dsn: str,
    redis_servers: RedisServers,
    shop: dict[str, Any],
) -> tuple[dict[str, Any], StoreProbe]:
    """The daemon's config and a probe of its store: PostgreSQL (the test's database on the
    shared server, migrated), or a private redis-server (AOF; no postgres section)."""
    source = shop["topics"][0]
    if kind == "postgres":
        data = config_dict(services, pg_dsn, [shop])
        migrate_all(parse_config(data, env={}))
        return data, PgProbe(pg_dsn, source)
    server = redis_servers.start(*AOF)
    prefix = unique("t")
    data = config_dict(Services(services.kafka, pg_dsn, server.url), pg_dsn, [shop], prefix)
    del data["postgres"]
    return data, RedisProbe(server, prefix, source)


@dataclass
class Kills:
    """What was seen at each kill."""

    uncommitted: list[bool] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    parked: Parked = field(default_factory=set)


def kill_at(d: Daemon, probe: StoreProbe, rng: random.Random, targets: list[int]) -> Kills:
    """For each target: start the daemon, wait until that many source messages are committed
    (and at least one more than at the last kill), wait a random moment, freeze the daemon,
    read the store as the kill leaves it, kill -9."""
    kills = Kills()
    for target in targets:
        d.start()
        goal = max(target, (kills.committed[-1] if kills.committed else 0) + 1)
        wait_for(
            lambda: probe.committed() >= goal,  # noqa: B023
            f"{goal} committed (at kills: {kills.committed})",
            240,
            d.check_alive,
            every=0.02,
        )
        time.sleep(rng.uniform(0, 0.05))  # the fault's moment, not a synchronisation
        d.freeze()
        kills.uncommitted.append(probe.uncommitted_work())
        kills.committed.append(probe.committed())
        kills.parked |= probe.parked()
        d.kill9()
    return kills


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_twenty_kill_9_at_random_moments_lose_nothing_and_apply_nothing_twice(
    kind: str,
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    redis_servers: RedisServers,
) -> None:
    """Proves that a crash at any instant loses nothing and applies nothing twice, on each
    store: about 50,000 customer and game events (about 5,000 streams) reach a 4-partition
    topic shuffled within windows of 100, 1% duplicated, with 0.1% withheld (the reference
    responder serves them on the replay topic when their gaps ask). The daemon runs as a real
    process in batches of at most 200 and is killed with -9 twenty times at random moments
    (each after progress since the last restart, each before the end), restarted each time.
    Then: every stream equals the oracle (100%), the per-row apply counters show no event
    applied twice, every event parked at a kill was applied, the holding table is empty, no
    gap and no dead letter is left, and the source checkpoints stand at the end of the topic.
    How many kills caught uncommitted work in the store is measured (and must not be zero,
    or the kills proved little)."""
    seed = SEED + (0 if kind == "postgres" else 1)
    rng = random.Random(seed)
    work = shop_workload(seed, customers=4800, games=370, duplicates=0.01, withheld=0.001)
    total = len(work.delivered)
    source, requests, replays = new_topic(partitions=4), new_topic(), new_topic()
    publish(services.kafka, source, work.delivered)
    shop = projection(
        "shop",
        [source],
        HANDLERS[kind],
        store=kind,
        batch_max_messages=200,
        gap_timeout="500ms",
        replay={"channel": "kafka", "topic": requests, "max_interval": "2s"},
        replay_topic=replays,
    )
    data, probe = store_config(kind, services, pg_dsn, redis_servers, shop)
    path = write_config(tmp_path / "config.yaml", data)

    # Kill moments spread over the run whatever the machine's speed: each once a target is
    # committed, then a little later at random, so it falls anywhere in a batch's life.
    targets = sorted(rng.sample(range(total // 25, total * 9 // 10), KILLS))
    started = time.monotonic()
    done = EndState(0, 0, 0, total)
    with (
        closing(probe),
        replay_responder(services.kafka, pg_dsn, work.log, requests, replays),
        daemon(path, tmp_path / "daemon.log") as d,
    ):
        kills = kill_at(d, probe, rng, targets)
        d.start()
        wait_for(lambda: probe.end_state() == done, f"the end state {done}", 300, d.check_alive)
        assert d.stop() == 0, d.tail()
        seconds = time.monotonic() - started
        compared = compare_shop(probe.views, "shop", work.log)
        positions = probe.positions()
        end = probe.end_state()
    parked_lost = sum(1 for s, q in kills.parked if positions.get(s, 0) < q)
    figures(
        f"crash-anywhere[{kind}]",
        {
            "store": kind,
            "seed": seed,
            "events": len(work.log),
            "delivered": total,
            "duplicates": work.duplicates,
            "withheld": len(work.withheld),
            "streams": compared.streams,
            "kills": len(kills.committed),
            "kills_with_uncommitted_work": sum(kills.uncommitted),
            "daemon_sessions_at_kills": dict(probe.seen),
            "kills_before_end": sum(c < total for c in kills.committed),
            "committed_at_kills": kills.committed,
            "parked_at_kills": len(kills.parked),
            "parked_lost": parked_lost,
            "streams_equal_pct": compared.percent_equal,
            "applied_twice": compared.applied_twice,
            "holding_at_end": end.parked,
            "gaps_at_end": end.open_gaps,
            "dead_letters": end.dead_letters,
            "seconds": round(seconds, 1),
        },
    )

    assert compared.all_equal, compared.examples
    assert compared.applied_twice == 0
    assert parked_lost == 0
    assert end == done
    assert len(kills.committed) == KILLS
    assert all(c < total for c in kills.committed), "a kill came after the end"
    assert sum(kills.uncommitted) > 0, "no kill caught uncommitted work: they proved little"
    assert kills.parked, "nothing was parked at any kill: parking was not exercised"
