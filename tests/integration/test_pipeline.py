"""The core pipeline end to end against real Kafka and PostgreSQL: shuffled, duplicated
delivery over several partitions ends in exactly the oracle's views."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from projector import scenarios
from tests.conftest import Services, unique
from tests.integration.gaps_harness import FakeClock, running_daemon, wait_until
from tests.integration.harness import (
    make_config,
    migrate_all,
    projection,
    publish,
    rows,
    run_until_caught_up,
)

pytestmark = pytest.mark.integration

ACCOUNT_COLUMNS = "id, owner, balance, deposits, withdrawals, rejected, applied_events, last_seq"


def account_rows(pg_dsn: str, schema: str = "accounts") -> dict[str, dict[str, object]]:
    names = [c.strip() for c in ACCOUNT_COLUMNS.split(",")]
    found = rows(pg_dsn, f"select {ACCOUNT_COLUMNS} from {schema}.accounts")
    return {r[0]: dict(zip(names, r, strict=True)) for r in found}


def test_shuffled_duplicated_events_on_several_partitions_equal_the_oracle(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the core promise on 20k events over 1,000 streams, shuffled within windows and 2%
    duplicated, on a 4-partition topic: every view row equals the oracle folded from the
    ordered log, and the per-row apply counter shows no event applied twice."""
    rng = random.Random(4)
    log = scenarios.account_log(rng, accounts=1000, events_per_account=20)
    assert len(log) == 20_000
    delivered = scenarios.with_duplicates(
        rng, scenarios.shuffle_within_windows(rng, log, 200), 0.02
    )
    topic = new_topic(partitions=4)
    publish(services.kafka, topic, delivered)
    config = make_config(services, pg_dsn, [projection("accounts", [topic], ["handlers.accounts"])])
    migrate_all(config)

    assert run_until_caught_up(config) == 0

    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.gaps") == [(0,)]
    assert rows(pg_dsn, "select count(*) from projector.dead_letters") == [(0,)]
    checkpoints = rows(pg_dsn, "select sum(next_offset) from projector.checkpoints")
    assert checkpoints == [(len(delivered),)]


def test_transactional_topic_checkpoints_reach_the_partition_end(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves a topic written by a transactional producer (an aborted transaction, then a
    committed one) is read up to its end: aborted events never reach the view, the burst run
    ends, and the stored checkpoint equals the end offset (the commit marker included), so
    lag reads 0 rather than 1 forever."""
    topic = new_topic()
    producer = Producer({"bootstrap.servers": services.kafka, "transactional.id": unique("tx")})
    producer.init_transactions(10)
    log = scenarios.account_log(random.Random(2), accounts=3, events_per_account=4)
    producer.begin_transaction()
    producer.produce(topic, json.dumps({**log[0], "data": {"owner": "aborted"}}).encode(), key=b"x")
    producer.abort_transaction(10)
    producer.begin_transaction()
    for wire in log:
        producer.produce(topic, json.dumps(wire).encode(), key=wire["stream"].encode())
    producer.commit_transaction(10)
    config = make_config(services, pg_dsn, [projection("accounts", [topic], ["handlers.accounts"])])
    migrate_all(config)

    assert run_until_caught_up(config) == 0

    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    consumer = Consumer(
        {
            "bootstrap.servers": services.kafka,
            "group.id": unique("probe"),
            "isolation.level": "read_committed",
        }
    )
    _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    consumer.close()
    assert rows(pg_dsn, "select next_offset from projector.checkpoints") == [(end,)]


def test_a_topic_created_after_the_daemon_started_is_consumed(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the daemon can start before its topic exists: it keeps polling (the missing topic
    is a warning, not a crash) and applies the events once the topic appears."""
    name = unique("late_topic")
    config = make_config(services, pg_dsn, [projection("accounts", [name], ["handlers.accounts"])])
    migrate_all(config)
    log = scenarios.account_log(random.Random(5), accounts=3, events_per_account=3)
    with running_daemon(config, FakeClock()) as daemon:
        worker = daemon.workers[0]
        started = worker.heartbeat
        # The loop has gone round for a while with the topic missing before it is created.
        wait_until(
            lambda: worker.heartbeat > started + 0.5, "the poll loop to run without the topic"
        )
        new_topic(name=name)
        publish(services.kafka, name, log)
        wait_until(
            lambda: account_rows(pg_dsn) == scenarios.accounts_oracle(log),
            "the late topic's events",
            limit=60,
        )
