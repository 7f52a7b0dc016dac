"""A crash at each named point of a batch's life (``PROJECTOR_CRASH_AT``, see
:mod:`projector.faults`), on both stores: the restarted daemon ends exactly at the oracle."""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from projector import scenarios
from projector.faults import POINTS
from projector.replay.responder import ReplayResponder
from tests.conftest import unique
from tests.integration.conftest import StoreUnderTest
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import daemon_process, publish
from tests.integration.test_replay_fill import responder_running
from tests.integration.test_responder import SCHEMA, TABLE, store_events

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_named_point_loses_nothing_and_applies_nothing_twice(
    point: str, store: StoreUnderTest, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves recovery from a SIGKILL at ``point`` (the third time it is reached; the first,
    for replay requests): customers
    and games, shuffled, 2% duplicated and 1% withheld (served by the replay responder), so
    that parking, draining and replay requests all happen. The armed daemon dies there (exit
    by SIGKILL, so the point was reached); a daemon started without it ends with the views
    equal to the oracles (their counters show no double apply), nothing parked, no gap, no
    dead letter, every checkpoint at its partition's end."""
    rng = random.Random(POINTS.index(point))
    log = scenarios.customer_log(rng, 120) + scenarios.game_log(rng, 10, 60)
    log = sorted(log, key=lambda w: (w["seq"], rng.random()))
    last = {w["stream"]: w["seq"] for w in log}
    candidates = [w for w in log if w["seq"] < last[w["stream"]]]
    withheld = {id(w) for w in rng.sample(candidates, len(log) // 100)}
    delivered = scenarios.with_duplicates(
        rng,
        scenarios.shuffle_within_windows(rng, [w for w in log if id(w) not in withheld], 100),
        0.02,
    )
    source, requests, replays = new_topic(partitions=2), new_topic(), new_topic()
    publish(store.services.kafka, source, delivered)
    store_events(store.pg_dsn, log)
    proj = store.projection(
        "shop",
        [source],
        ["customers", "game"],
        batch_max_messages=50,
        gap_timeout="200ms",
        replay={"channel": "kafka", "topic": requests, "max_interval": "1s"},
        replay_topic=replays,
    )
    path = store.process_config(tmp_path, [proj])
    responder = ReplayResponder(
        store.services.kafka,
        store.pg_dsn,
        replays,
        requests_topic=requests,
        group=unique("responder"),
        schema=SCHEMA,
        table=TABLE,
    )
    with responder_running(responder, "kafka"):
        armed = daemon_process(
            path,
            log=tmp_path / "armed.log",
            # Replay requests go out in a few rounds only: crash at the first one.
            env={
                "PROJECTOR_CRASH_AT": point,
                "PROJECTOR_CRASH_AFTER": "1" if point == "mid-replay-request" else "3",
            },
        )
        try:
            code = armed.wait(120)
        except subprocess.TimeoutExpired:
            armed.kill()  # it never reached the point: don't leave it running
            armed.wait(30)
            raise
        assert code == -signal.SIGKILL, (tmp_path / "armed.log").read_text()[-2000:]
        crashed_at = store.views.own("shop")
        restarted = daemon_process(path, log=tmp_path / "restarted.log")
        try:

            def at_the_oracle() -> bool:
                try:
                    customers = store.views.customers("shop")
                    games = store.views.games("shop")
                except AssertionError:  # a view read half-way through a batch's writes
                    return False
                oracle = scenarios.customers_oracle(log), scenarios.game_oracle(log)
                return (customers, games) == oracle

            wait_until(at_the_oracle, "the restarted daemon to reach the oracle", limit=120)
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(30) == 0
    assert store.views.customers("shop") == scenarios.customers_oracle(log)
    assert store.views.games("shop") == scenarios.game_oracle(log)
    own = store.views.own("shop")
    assert (own.parked, own.open_gaps, own.dead_letters) == (0, 0, 0)
    assert own.checkpoint_sum >= len(delivered)
    print(f"{point} on {store.kind}: crashed with {crashed_at.checkpoint_sum} committed")
