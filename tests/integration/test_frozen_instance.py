"""An instance frozen past the session timeout (SIGSTOP, then SIGCONT) can't write: the store's
epochs fence it, checkpoints never go back, nothing is applied twice."""

from __future__ import annotations

import itertools
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from projector import scenarios
from tests.integration.conftest import StoreUnderTest
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import daemon_process, publish

pytestmark = pytest.mark.integration


def test_a_frozen_instance_is_fenced_when_it_wakes(
    store: StoreUnderTest, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves fencing with real processes on both stores: two instances share a 2-partition
    topic while events arrive; one is frozen with SIGSTOP past the session timeout (6 s here),
    the other takes its partitions over (on PostgreSQL once the server ended the frozen one's
    open transaction, idle_in_transaction_timeout, which held its checkpoint row locks); the
    frozen one is woken with SIGCONT and finds itself fenced (its batch in flight is refused). Sampled all along, the stored
    checkpoints never go back; at the end the views equal the oracle (per-row counters show
    no double apply)."""
    log = scenarios.customer_log(random.Random(20), 600)
    topic = new_topic(partitions=2)
    proj = store.projection("people", [topic], ["customers"], batch_max_messages=20)
    data = store.config_dict([proj])
    # PostgreSQL: the frozen instance's open transaction holds its checkpoint row locks; the
    # server ends it after this, so the new owner's claim goes through.
    data["postgres"]["idle_in_transaction_timeout"] = "5s"
    path = store.process_config_from(tmp_path, data)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [daemon_process(path, log=p) for p in logs]
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(store.views.own("people").checkpoint_sum)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wait_until(lambda: all("assigned" in p.read_text() for p in logs), "both to join", 60)
        publish(store.services.kafka, topic, log[: len(log) // 2])
        wait_until(lambda: store.views.own("people").checkpoint_sum > 100, "progress", 60)
        frozen = procs[0]
        frozen.send_signal(signal.SIGSTOP)
        publish(store.services.kafka, topic, log[len(log) // 2 :])
        # The other instance gets the frozen one's partitions once its session expires.
        wait_until(
            lambda: store.views.own("people").checkpoint_sum == len(log),
            "the other instance to apply everything",
            limit=90,
        )
        seen = len(logs[0].read_text())
        frozen.send_signal(signal.SIGCONT)

        def woke() -> bool:
            after = logs[0].read_text()[seen:]
            return frozen.poll() is not None or any(
                word in after for word in ("fenced", "assigned", "revoked")
            )

        wait_until(woke, "the frozen one to find it lost its partitions", 60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
        stop.set()
        sampler.join(10)
    assert all(b >= a for a, b in itertools.pairwise(samples)), "a checkpoint went back"
    assert store.views.customers("people") == scenarios.customers_oracle(log)
    assert store.views.own("people").checkpoint_sum == len(log)
    print(f"{store.kind}: exit codes {codes}, {len(samples)} checkpoint samples")
