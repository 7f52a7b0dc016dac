"""Withheld events served only through replay: 0.5% of a shuffled, duplicated log never reaches
the topic; the daemon's requests go to the reference responder (Kafka or HTTP channel), which
re-publishes them from the event store (on the replay topic, or on the source topic itself)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from projector import scenarios
from projector.replay.responder import ReplayResponder, serve_http
from tests.conftest import Services, unique
from tests.integration.harness import (
    make_config,
    migrate_all,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.test_pipeline import account_rows
from tests.integration.test_responder import SCHEMA, TABLE, store_events

pytestmark = pytest.mark.integration


@contextmanager
def responder_running(responder: ReplayResponder, channel: str) -> Iterator[str | None]:
    """The responder in a thread; for the HTTP channel, yields its URL."""
    stop = threading.Event()
    address: dict[str, tuple[str, int]] = {}
    ready = threading.Event()

    def on_ready(addr: tuple[str, int]) -> None:
        address["addr"] = addr
        ready.set()

    def target() -> None:
        if channel == "http":
            serve_http(responder, ("127.0.0.1", 0), stop, on_ready=on_ready)
        else:
            responder.run(stop)

    thread = threading.Thread(target=target)
    thread.start()
    try:
        if channel == "http":
            assert ready.wait(30), "the HTTP responder did not start"
            host, port = address["addr"]
            yield f"http://{host}:{port}/"
        else:
            yield None
    finally:
        stop.set()
        thread.join(30)
        responder.close()


@pytest.mark.parametrize("channel", ["kafka", "http"])
def test_withheld_events_are_served_only_through_replay(
    channel: str,
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the replay loop closes: 10k events over 500 streams, shuffled and 1% duplicated,
    with 0.5% withheld from the topic (but in the write side's event store); gaps open, the
    requests reach the responder, the re-published events fill them, and the run ends with no
    gap, nothing parked and every view row equal to the oracle. Kafka channel: replays come on
    a separate replay topic, whose one partition against the source's three the daemon warns
    about at start (read from the cluster's metadata); HTTP channel: on the source topic
    itself, and nothing is said."""
    rng = random.Random(21)
    log = scenarios.account_log(rng, accounts=500, events_per_account=20)
    # A missing event shows only when a later one of its stream arrives: a stream's newest
    # event can't be known missing (nothing tells it exists), so none of those is withheld.
    candidates = [w for w in log if 1 < w["seq"] < 20]
    withheld = {id(w) for w in rng.sample(candidates, len(log) // 200)}
    delivered = scenarios.with_duplicates(
        rng,
        scenarios.shuffle_within_windows(rng, [w for w in log if id(w) not in withheld], 100),
        0.01,
    )
    source, requests = new_topic(partitions=3), new_topic()
    replay_topic = new_topic() if channel == "kafka" else source
    publish(services.kafka, source, delivered)
    store_events(pg_dsn, log)
    responder = ReplayResponder(
        services.kafka,
        pg_dsn,
        replay_topic,
        requests_topic=requests if channel == "kafka" else None,
        group=unique("responder"),
        schema=SCHEMA,
        table=TABLE,
    )
    with responder_running(responder, channel) as url:
        replay: dict[str, Any] = {"channel": channel, "max_interval": "2s"}
        replay.update({"topic": requests} if channel == "kafka" else {"url": url})
        extra: dict[str, Any] = {"replay_topic": replay_topic} if channel == "kafka" else {}
        proj = projection(
            "accounts", [source], ["handlers.accounts"], gap_timeout="300ms", replay=replay, **extra
        )
        config = make_config(services, pg_dsn, [proj])
        migrate_all(config)
        with caplog.at_level("WARNING", logger="projector.runner.replay_layout"):
            assert run_until_caught_up(config) == 0
    layout = [r.getMessage() for r in caplog.records if r.name.endswith("replay_layout")]
    if channel == "kafka":
        [said] = layout
        assert f"replay topic {replay_topic} has 1 partition(s) and the source 3" in said
    else:
        assert layout == []
    assert len(withheld) == 50
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)]
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
