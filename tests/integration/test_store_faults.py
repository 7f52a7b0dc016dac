"""Faults under the store, on both stores: the daemon killed -9 at random moments, the Redis
server killed -9 and restarted under a running daemon, Redis's script cache flushed. Each run
ends in exactly the oracles' views (the per-row apply counters show any double apply) and a
clean state of projector's own. The daemon and the Redis servers run as real processes."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from projector import scenarios
from tests.conftest import Services, unique
from tests.integration.conftest import StoreUnderTest
from tests.integration.harness import (
    config_dict,
    daemon_process,
    projection,
    publish,
    write_config,
)
from tests.integration.redis_server import AOF, RedisServer, RedisServers
from tests.integration.views import OwnState, RedisViews, Views

pytestmark = pytest.mark.integration

Wire = dict[str, Any]
REDIS_HANDLERS = ["handlers.customers_redis", "handlers.game_redis"]


def shop_log(rng: random.Random, customers: int, games: int) -> tuple[list[Wire], list[Wire]]:
    """Customers and games interleaved (each stream in order when sorted by seq), and that
    log as delivered: shuffled within windows and 3% duplicated."""
    log = scenarios.customer_log(rng, customers) + scenarios.game_log(rng, games, 100)
    rng.shuffle(log)
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    delivered = scenarios.with_duplicates(
        rng, scenarios.shuffle_within_windows(rng, log, 100), 0.03
    )
    return log, delivered


def tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def committed(views: Views) -> int:
    return views.own("shop").checkpoint_sum


def wait_for_progress(
    views: Views, proc: subprocess.Popen[bytes], log: Path, target: int, limit: float = 60
) -> int:
    """Poll (bounded) until the daemon has committed ``target`` offsets, or at least one more
    than now; what is committed then."""
    target = max(target, committed(views) + 1)
    deadline = time.monotonic() + limit
    while (now := committed(views)) < target:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {tail(log)}"
        assert time.monotonic() < deadline, f"no progress to {target} in {limit}s: {tail(log)}"
        time.sleep(0.02)
    return now


def wait_for_state(
    views: Views,
    proc: subprocess.Popen[bytes],
    log: Path,
    expected: OwnState,
    limit: float = 90,
) -> None:
    """Poll (bounded) until projector's own state of ``shop`` is ``expected``."""
    deadline = time.monotonic() + limit
    seen = views.own("shop")
    while seen != expected:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {tail(log)}"
        assert time.monotonic() < deadline, f"stuck at {seen}, want {expected}: {tail(log)}"
        time.sleep(0.05)
        seen = views.own("shop")


def wait_for_start(proc: subprocess.Popen[bytes], log: Path, since: int, limit: float = 30) -> None:
    """Poll (bounded) until the log, past ``since``, shows the daemon has its partitions (its
    signal handlers are installed by then: a SIGTERM is a clean stop, not a kill)."""
    deadline = time.monotonic() + limit
    while "projector.source.kafka: assigned" not in log.read_text()[since:]:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {tail(log)}"
        assert time.monotonic() < deadline, f"the daemon did not start: {tail(log)}"
        time.sleep(0.02)


@contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon process for the block; killed if the block leaves it running (a failing test
    leaves no daemon behind)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def stop_daemon(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM; the daemon must exit 0 within the grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, tail(log)


def assert_views_equal_oracles(views: Views, log: list[Wire]) -> None:
    assert views.customers("shop") == scenarios.customers_oracle(log)
    assert views.games("shop") == scenarios.game_oracle(log)
    assert views.parked_count("shop") == 0


KILLS = 8


def test_kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice(
    store: StoreUnderTest, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves crash safety on both stores: 8 kill -9 of the daemon process at random moments
    while it applies about 7,000 shuffled, 3%-duplicated customer and game events over 4
    partitions in small batches, each followed by a restart, end in exactly the oracles'
    views (applied_events and plays would show a batch applied twice, a lost one shows as a
    missing or stale row), nothing parked (nor in the parked counter), no gap, no dead
    letter, every checkpoint at its partition's end. Every kill lands before the end."""
    rng = random.Random(31)
    log, delivered = shop_log(rng, customers=800, games=50)
    total = len(delivered)
    topic = new_topic(partitions=4)
    publish(store.services.kafka, topic, delivered)
    shop = store.projection("shop", [topic], ["customers", "game"], batch_max_messages=10)
    path = store.process_config(tmp_path, [shop])
    out = path.with_suffix(".log")

    # Kill points spread over the run, whatever the machine's speed, each a little later at
    # random so that it falls anywhere in a batch: planning, writing, committing, or between.
    targets = sorted(rng.sample(range(total // 20, total * 9 // 10), KILLS))
    at_kills: list[OwnState] = []
    started = time.monotonic()
    for target in targets:
        with reaped(daemon_process(path)) as proc:
            wait_for_progress(store.views, proc, out, target)
            time.sleep(rng.uniform(0, 0.05))  # the fault's moment, not a synchronisation
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        at_kills.append(store.views.own("shop"))

    since = len(out.read_text())
    with reaped(daemon_process(path)) as final:
        wait_for_state(store.views, final, out, OwnState(0, 0, 0, total))
        wait_for_start(final, out, since)
        stop_daemon(final, out)
    short_of_all = sum(s.checkpoint_sum < total for s in at_kills)
    print(
        f"{store.kind}: {total} events, kills={len(at_kills)}, kills_short_of_all={short_of_all},"
        f" committed_at_kills={[s.checkpoint_sum for s in at_kills]},"
        f" parked_at_kills={[s.parked for s in at_kills]}, {time.monotonic() - started:.1f}s"
    )

    assert short_of_all == KILLS, "a kill came after the end; make the workload larger"
    assert_views_equal_oracles(store.views, log)


def redis_shop_config(
    services: Services, server: RedisServer, tmp_path: Path, topic: str, batch: int
) -> tuple[Path, RedisViews]:
    """A config file whose only store is ``server`` (no postgres section), and its reader."""
    prefix = unique("t")
    private = Services(services.kafka, services.pg_dsn, server.url)
    shop = projection("shop", [topic], REDIS_HANDLERS, store="redis", batch_max_messages=batch)
    data = config_dict(private, services.pg_dsn, [shop], prefix)
    del data["postgres"]
    return write_config(tmp_path / "config.yaml", data), RedisViews(server.url, prefix)


OUTAGES = 2


def test_redis_killed_and_restarted_mid_run_loses_nothing(
    services: Services,
    new_topic: Callable[..., str],
    tmp_path: Path,
    redis_servers: RedisServers,
) -> None:
    """Proves the daemon rides out a Redis crash: a private redis-server (AOF, appendfsync
    always) is killed -9 twice while batches are being applied, stays down 1.5 s each time
    (the daemon retries and does not exit), and comes back on the same port and data dir with
    an empty script cache (the store reloads its scripts after NOSCRIPT by itself). The run
    ends in exactly the oracles' views with nothing parked, no gap, no dead letter and every
    checkpoint at its partition's end; the daemon log shows the retries."""
    server = redis_servers.start(*AOF, "--appendfsync", "always")
    rng = random.Random(37)
    # Long enough that the daemon (~20k events/s here, in batches of 40) is still reading at
    # each outage: 7k events once ran out between a progress poll and the kill.
    log, delivered = shop_log(rng, customers=2400, games=150)
    total = len(delivered)
    topic = new_topic(partitions=4)
    publish(services.kafka, topic, delivered)
    path, views = redis_shop_config(services, server, tmp_path, topic, batch=40)
    out = path.with_suffix(".log")

    survived: list[int] = []
    at_kill: list[int] = []  # committed just before each kill: nothing commits while Redis is down
    with reaped(daemon_process(path)) as proc:
        for outage in range(1, OUTAGES + 1):
            seen = wait_for_progress(views, proc, out, total * outage // (OUTAGES + 1))
            server.kill()
            at_kill.append(seen)
            time.sleep(1.5)  # the outage's length, not a synchronisation
            assert proc.poll() is None, f"the daemon exited without Redis: {tail(out)}"
            server.start()
            survived.append(committed(views))
            # appendfsync always: whatever a reader saw committed before the crash is still there.
            assert survived[-1] >= seen
        wait_for_state(views, proc, out, OwnState(0, 0, 0, total))
        stop_daemon(proc, out)
    text = out.read_text()
    retries = text.count("transient store error")
    print(
        f"{total} events, committed at each kill: {at_kill}, when Redis came back: {survived},"
        f" retries logged={retries}"
    )

    # What was committed when Redis came back can be the end already: the daemon reconnects as
    # soon as the port opens and may finish before this test reads. What counts is the kill.
    assert all(n < total for n in at_kill), "an outage came after the end; make it longer"
    assert retries >= OUTAGES, text[-3000:]
    assert text.count("(NOSCRIPT); loading them again") >= OUTAGES, text[-3000:]
    assert_views_equal_oracles(views, log)


def test_script_flush_heals_noscript(
    services: Services,
    new_topic: Callable[..., str],
    tmp_path: Path,
    redis_servers: RedisServers,
) -> None:
    """Proves a running daemon survives Redis forgetting its Lua scripts (SCRIPT FLUSH, as
    after a restart or a failover): half the events are applied, the script cache is flushed,
    the other half is published, and everything is applied (no dead letter, nothing parked,
    views equal to the oracles), the store having loaded its scripts again. A private server:
    SCRIPT FLUSH is server-wide and would hit any other test using the shared one."""
    server = redis_servers.start(*AOF)
    rng = random.Random(41)
    log, delivered = shop_log(rng, customers=100, games=10)
    half = len(delivered) // 2
    topic = new_topic(partitions=4)
    path, views = redis_shop_config(services, server, tmp_path, topic, batch=200)
    out = path.with_suffix(".log")

    with reaped(daemon_process(path)) as proc:
        publish(services.kafka, topic, delivered[:half])
        wait_for_progress(views, proc, out, half)
        assert server.client().script_flush()
        publish(services.kafka, topic, delivered[half:])
        wait_for_state(views, proc, out, OwnState(0, 0, 0, len(delivered)))
        stop_daemon(proc, out)

    assert "NOSCRIPT" in out.read_text(), "the flush went unnoticed: the test proves nothing"
    assert_views_equal_oracles(views, log)
