"""Operating a Redis-only deployment (no PostgreSQL section at all) with the same commands and
metrics as PostgreSQL: check-config, migrate, run, status, gaps list/skip, inspect,
dead-letters list/skip/purge, and /metrics read from Redis at scrape time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from projector.cli import app
from projector.config import parse_config
from tests.conftest import Services, unique
from tests.integration.gaps_harness import FakeClock, running_daemon, wait_until
from tests.integration.harness import WIRE_DECODER, publish, write_config
from tests.integration.test_ops import value
from tests.integration.views import RedisViews

pytestmark = pytest.mark.integration


def wire(stream: str, seq: int, kind: str, **data: Any) -> dict[str, Any]:
    return {"stream": stream, "seq": seq, "ts": seq, "type": kind, "data": data}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def redis_only(services: Services, prefix: str, topic: str, **extra: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": services.kafka, "group_prefix": unique("g")},
        "redis": {
            "url": services.redis_url.replace("://", "://:canary-secret@", 1),
            "prefix": prefix,
        },
        "metrics": {"enabled": False},
        "projections": [
            {
                "name": "shop",
                "store": "redis",
                "topics": [topic],
                "handlers": ["handlers.customers_redis"],
                "decoder": WIRE_DECODER,
                **extra,
            }
        ],
    }


def test_a_redis_only_deployment_is_operated_with_the_usual_commands(
    services: Services, redis_prefix: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves the commands work on the Redis store, with no PostgreSQL configured: a stream
    with a poison event (a rename before the create) and one with a hole (seq 2 missing) are
    run; status, gaps list and inspect show the parked events, the gap and the dead letter;
    dead-letters skip and gaps skip resume both streams and drain what was parked; purge
    removes the resolved letter. The Redis password never shows in any output."""
    if "@" in services.redis_url:
        pytest.skip("the test Redis already has credentials in its URL")
    topic = new_topic()
    publish(
        services.kafka,
        topic,
        [
            wire("customer:ok", 1, "CUSTOMER_CREATED", id="ok", name="Ok"),
            wire("customer:bad", 1, "CUSTOMER_RENAMED", id="bad", name="early"),
            wire("customer:bad", 2, "CUSTOMER_CREATED", id="bad", name="Bad"),
            wire("customer:hole", 1, "CUSTOMER_CREATED", id="hole", name="Hole"),
            wire("customer:hole", 3, "CUSTOMER_RENAMED", id="hole", name="Whole"),
        ],
    )
    data = redis_only(services, redis_prefix, topic)
    # The test Redis has no password: AUTH with one fails, so the run uses the plain URL and
    # only the commands that never connect see the canary.
    path = write_config(tmp_path / "projector.yaml", data)
    checked = invoke("check-config", "-c", str(path))
    assert checked.exit_code == 0, checked.output
    assert "redis:" in checked.output and "canary-secret" not in checked.output
    data["redis"]["url"] = services.redis_url
    path = write_config(tmp_path / "projector.yaml", data)
    c = ["-c", str(path)]

    migrated = invoke("migrate", *c)
    assert migrated.exit_code == 0, migrated.output
    ran = invoke("run", *c, "--exit-when-caught-up")
    assert ran.exit_code == 0, ran.output

    [status] = json.loads(invoke("status", *c, "--json", "--sample", "0").stdout)
    assert (status["parked"], status["open_gaps"], status["dead_letters"]) == (2, 1, 1)
    assert status["lag"] == 0
    [gap] = json.loads(invoke("gaps", "list", *c, "--json").stdout)
    assert (gap["stream"], gap["from_seq"], gap["to_seq"]) == ("customer:hole", 2, 2)
    story = json.loads(invoke("inspect", "shop", "customer:bad", *c, "--json").stdout)
    assert story["position"]["blocked_seq"] == 1
    assert [p["seq"] for p in story["parked"]] == [2]
    [letter] = json.loads(invoke("dead-letters", "list", *c, "--json").stdout)
    assert letter["kind"] == "handler" and letter["stream"] == "customer:bad"

    skipped = invoke("dead-letters", "skip", str(letter["id"]), "-p", "shop", *c)
    assert skipped.exit_code == 0, skipped.output
    gap_skipped = invoke("gaps", "skip", "-p", "shop", "--stream", "customer:hole", *c)
    assert gap_skipped.exit_code == 0, gap_skipped.output
    assert "skipped customer:hole 2-2" in gap_skipped.output

    views = RedisViews(services.redis_url, redis_prefix)
    customers = views.customers("shop")
    assert {cid: row["name"] for cid, row in customers.items()} == {
        "ok": "Ok",
        "bad": "Bad",
        "hole": "Whole",
    }
    own = views.own("shop")
    assert (own.parked, own.open_gaps, own.dead_letters) == (0, 0, 0)
    assert views.parked_count("shop") == 0
    purged = invoke("dead-letters", "purge", *c)
    assert "purged 1 dead letter(s)" in purged.output
    assert json.loads(invoke("dead-letters", "list", *c, "--json", "--status", "").stdout) == []


def test_metrics_are_read_from_redis_at_scrape_time(
    services: Services, redis_prefix: str, new_topic: Callable[..., str]
) -> None:
    """Proves /metrics on the Redis store: parked events and open gaps of a projection are
    read from Redis when scraped, and follow the fill."""
    topic = new_topic()
    publish(
        services.kafka,
        topic,
        [
            wire("customer:a", 1, "CUSTOMER_CREATED", id="a", name="A"),
            wire("customer:a", 3, "CUSTOMER_RENAMED", id="a", name="A3"),
            wire("customer:a", 4, "CUSTOMER_RENAMED", id="a", name="A4"),
        ],
    )
    data = redis_only(services, redis_prefix, topic)
    data["redis"]["url"] = services.redis_url
    data["metrics"] = {"enabled": True, "port": 0}
    config = parse_config(data, env={})
    with running_daemon(config, FakeClock()) as daemon:
        assert daemon.ops is not None
        port = daemon.ops.port
        wait_until(
            lambda: value(port, "projector_parked_events", projection="shop") == 2, "2 parked"
        )
        assert value(port, "projector_open_gaps", projection="shop") == 1
        publish(
            services.kafka, topic, [wire("customer:a", 2, "CUSTOMER_RENAMED", id="a", name="A2")]
        )
        wait_until(
            lambda: value(port, "projector_parked_events", projection="shop") == 0, "the fill"
        )
        assert value(port, "projector_open_gaps", projection="shop") == 0
