"""After kill -9, the restarted instance applies again within seconds, not after the group's
session timeout: static membership gives it its partitions back at once."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from projector import scenarios
from tests.integration.conftest import StoreUnderTest
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import daemon_process, publish

pytestmark = pytest.mark.integration

SESSION_TIMEOUT_MS = 45_000  # librdkafka's default: what a dynamic member would wait for


def test_a_restart_after_kill_9_applies_again_within_ten_seconds(
    store: StoreUnderTest, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves recovery time on both stores: with the group's session timeout at librdkafka's
    default 45 s, a daemon killed with SIGKILL mid-run and started again commits its next batch
    within 10 s of the restart (measured and printed), because the same static member id gets
    its partitions back without waiting for the session to expire."""
    log = scenarios.customer_log(random.Random(17), 2000)
    topic = new_topic(partitions=2)
    publish(store.services.kafka, topic, log)
    proj = store.projection("people", [topic], ["customers"], batch_max_messages=20)
    data = store.config_dict([proj])
    data["kafka"]["consumer"] = {"session.timeout.ms": SESSION_TIMEOUT_MS}
    path = store.process_config_from(tmp_path, data)

    def committed() -> int:
        return store.views.own("people").checkpoint_sum

    first = daemon_process(path, log=tmp_path / "first.log")
    wait_until(lambda: committed() > 500, "the first daemon to apply", limit=60)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    at_kill = committed()
    assert at_kill < len(log), "killed before it finished"
    started = time.monotonic()
    second = daemon_process(path, log=tmp_path / "second.log")
    try:
        wait_until(
            lambda: committed() > at_kill, "the restart to apply", limit=SESSION_TIMEOUT_MS / 1000
        )
        recovery = time.monotonic() - started
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    print(f"{store.kind}: applying again {recovery:.2f} s after the restart (killed at {at_kill})")
    assert recovery < 10
