"""/metrics, /healthz and /readyz of a running daemon, checked against the store and the
broker: the numbers equal reality."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from projector.config import Config, parse_config
from tests.conftest import Services
from tests.integration import blocking_handler
from tests.integration.gaps_harness import FakeClock, running_daemon, wait_until
from tests.integration.harness import config_dict, migrate_all, projection, publish, rows
from tests.integration.test_gaps import split_log

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = get(port, "/metrics")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(port: int, name: str, **labels: str) -> float | None:
    return samples(port).get((name, tuple(sorted(labels.items()))))


def ops_config(
    services: Services,
    pg_dsn: str,
    topics: list[str],
    handler: str = "handlers.accounts",
    **extra: Any,
) -> Config:
    data = config_dict(services, pg_dsn, [projection("accounts", topics, [handler], **extra)])
    data["metrics"] = {"enabled": True, "port": 0, "stall_after": "1s", "ready_max_gap_age": "60s"}
    config = parse_config(data, env={})
    migrate_all(config)
    return config


def test_metrics_equal_the_store_and_the_broker(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the scrape tells the truth during a run: parked equals the holding table's rows,
    open gaps and the oldest gap's age follow the (injected) clock, consumer lag is 0 once
    caught up and equals end offset minus checkpoint for new messages, the events counters
    match what was consumed, gap_timeout is exported, and /readyz turns 503 when a gap grows
    older than ready_max_gap_age."""
    _, delivered, withheld = split_log(accounts=4, events=6, withheld_seqs={3})
    topic = new_topic(partitions=2)
    publish(services.kafka, topic, delivered)
    config = ops_config(services, pg_dsn, [topic], gap_timeout="30s")
    clock = FakeClock()
    with running_daemon(config, clock) as daemon:
        assert daemon.ops is not None
        port = daemon.ops.port
        wait_until(
            lambda: (
                value(port, "projector_events_total", projection="accounts", outcome="consumed")
                == len(delivered)
            ),
            "consumption",
        )
        [(parked,)] = rows(pg_dsn, "select count(*) from projector.holding")
        assert parked == 4 * 3
        assert value(port, "projector_parked_events", projection="accounts") == parked
        assert value(port, "projector_open_gaps", projection="accounts") == 4
        assert value(port, "projector_gap_timeout_seconds", projection="accounts") == 30
        wait_until(lambda: get(port, "/readyz")[0] == 200, "ready (caught up, gaps young)")
        clock.advance(61)
        assert value(
            port, "projector_oldest_gap_age_seconds", projection="accounts"
        ) == pytest.approx(61, abs=1)
        status, reason = get(port, "/readyz")
        assert status == 503 and "gap" in reason
        # The lag is read from the broker every couple of seconds, not per batch.
        wait_until(
            lambda: all(
                value(
                    port,
                    "projector_consumer_lag_messages",
                    projection="accounts",
                    topic=topic,
                    partition=str(tp),
                )
                == 0
                for tp in (0, 1)
            ),
            "the lag to read 0 once caught up",
        )
        publish(services.kafka, topic, withheld)
        wait_until(
            lambda: value(port, "projector_parked_events", projection="accounts") == 0, "the fill"
        )
        assert value(port, "projector_open_gaps", projection="accounts") == 0
        assert value(port, "projector_gaps_total", projection="accounts", event="detected") == 4
        assert value(port, "projector_gaps_total", projection="accounts", event="filled") == 4
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/nope")[0] == 404


def test_healthz_turns_503_when_the_poll_loop_stalls(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves /healthz reports a stalled loop: a handler stuck on one batch for longer than
    stall_after (1 s) turns it 503 naming the projection; released, it is 200 again."""
    blocking_handler.RELEASE.clear()
    topic = new_topic()
    config = ops_config(services, pg_dsn, [topic], handler="tests.integration.blocking_handler")
    try:
        with running_daemon(config, FakeClock()) as daemon:
            assert daemon.ops is not None
            port = daemon.ops.port
            wait_until(lambda: get(port, "/healthz")[0] == 200, "healthy")
            publish(
                services.kafka,
                topic,
                [
                    {
                        "stream": "account:1",
                        "seq": 1,
                        "type": "OPENED",
                        "ts": 1,
                        "data": {"owner": "o", "block": True},
                    }
                ],
            )
            _status, reason = wait_until(
                lambda: (r := get(port, "/healthz"))[0] == 503 and r, "stalled"
            )
            assert "accounts" in reason
            blocking_handler.RELEASE.set()
            wait_until(lambda: get(port, "/healthz")[0] == 200, "healthy again")
    finally:
        blocking_handler.RELEASE.set()


def test_instance_without_partitions_is_ready(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves /readyz for more replicas than partitions: of two instances on a one-partition
    topic, the one that got no partition is ready too."""
    topic = new_topic(partitions=1)
    config = ops_config(services, pg_dsn, [topic])
    clock = FakeClock()
    with running_daemon(config, clock) as first, running_daemon(config, clock) as second:
        assert first.ops is not None and second.ops is not None
        wait_until(
            lambda: rows(pg_dsn, "select count(*) from projector.checkpoints") == [(1,)],
            "assignment",
        )
        wait_until(lambda: get(first.ops.port, "/readyz")[0] == 200, "first ready")  # type: ignore[union-attr]
        wait_until(lambda: get(second.ops.port, "/readyz")[0] == 200, "second ready")  # type: ignore[union-attr]
        reasons = {
            get(first.ops.port, "/readyz")[1].strip(),
            get(second.ops.port, "/readyz")[1].strip(),
        }
        assert reasons == {"ready"}


def test_lag_metric_equals_end_offset_minus_checkpoint_while_paused(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the lag gauge while behind: with the source paused by back-pressure (max_parked)
    the per-partition lag in messages equals the partition's end offset minus the stored
    checkpoint, the back-pressure gauge is 1, and the lag in seconds is positive. Messages
    published while the source stays paused count too: a paused partition is not fetched,
    so the end offset its last fetch brought back would hide them."""
    _, delivered, _ = split_log(accounts=60, events=10, withheld_seqs={2})
    source, replay_topic = new_topic(), new_topic()
    publish(services.kafka, source, delivered)
    config = ops_config(
        services, pg_dsn, [source], replay_topic=replay_topic, max_parked=50, batch_max_messages=40
    )
    with running_daemon(config, FakeClock()) as daemon:
        assert daemon.ops is not None
        port = daemon.ops.port
        wait_until(
            lambda: value(port, "projector_backpressure", projection="accounts") == 1,
            "back-pressure",
        )

        def lag_matches(end_offset: int) -> bool:
            [(checkpoint,)] = rows(
                pg_dsn, "select next_offset from projector.checkpoints where topic = %s", (source,)
            )
            lag = value(
                port,
                "projector_consumer_lag_messages",
                projection="accounts",
                topic=source,
                partition="0",
            )
            return lag is not None and lag > 0 and lag == end_offset - checkpoint

        wait_until(lambda: lag_matches(len(delivered)), "the lag gauge: end offset - checkpoint")
        later = [{**w, "stream": f"later:{w['stream']}"} for w in delivered[:30]]
        publish(services.kafka, source, later)
        assert value(port, "projector_backpressure", projection="accounts") == 1
        end = len(delivered) + len(later)
        wait_until(lambda: lag_matches(end), "the lag gauge to count what came while paused")
        seconds = value(
            port,
            "projector_consumer_lag_seconds",
            projection="accounts",
            topic=source,
            partition="0",
        )
        assert seconds is not None and seconds > 0


def test_the_endpoint_listens_on_loopback_only_and_changes_nothing(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the HTTP endpoint is safe by default: with no host configured it listens on
    127.0.0.1 only, and it has no route that changes anything: POST, PUT, PATCH and DELETE on
    every path are refused (501), while GET works."""
    data = config_dict(
        services, pg_dsn, [projection("accounts", [new_topic()], ["handlers.accounts"])]
    )
    data["metrics"] = {"enabled": True, "port": 0}
    config = parse_config(data, env={})
    migrate_all(config)
    assert config.metrics.host == "127.0.0.1"
    with running_daemon(config, FakeClock()) as daemon:
        assert daemon.ops is not None
        port = daemon.ops.port
        assert daemon.ops.host == "127.0.0.1"
        for path in ("/metrics", "/healthz", "/readyz", "/"):
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{path}", data=b"{}", method=method
                )
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=10)
                refused.value.close()  # it holds the connection
                assert refused.value.code == 501, (method, path)
        assert get(port, "/metrics")[0] == 200
