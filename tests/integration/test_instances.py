"""Several daemon instances as real processes in one consumer group."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from projector import scenarios
from projector.config import parse_config
from tests.conftest import Services
from tests.integration.gaps_harness import wait_until
from tests.integration.harness import (
    config_dict,
    daemon_process,
    migrate_all,
    projection,
    publish,
    rows,
    write_config,
)
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration


def publish_split(
    services: Services,
    topic_a: str,
    topic_b: str,
    rng: random.Random,
    accounts: int,
    events_per_account: int,
) -> tuple[list[scenarios.Wire], int]:
    """An account log whose streams are split over two topics (odd seqs on ``topic_a``, even
    on ``topic_b``, each shuffled within windows), so whoever owns the two topics' partitions
    must serialise on every stream; the log, and how many messages were published."""
    log = scenarios.account_log(rng, accounts=accounts, events_per_account=events_per_account)
    odd = [w for w in log if w["seq"] % 2]
    even = [w for w in log if not w["seq"] % 2]
    total = publish(services.kafka, topic_a, scenarios.shuffle_within_windows(rng, odd, 100))
    total += publish(services.kafka, topic_b, scenarios.shuffle_within_windows(rng, even, 100))
    return log, total


@pytest.mark.parametrize("strategy", [None, "cooperative-sticky"])
def test_two_instances_share_the_partitions_and_serialise_on_shared_streams(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    strategy: str | None,
) -> None:
    """Proves two instances of one group split the partitions and, where one stream's events
    arrive on two topics owned by different instances, serialise on the stream in the store:
    the views equal the oracle. The second instance joins once the first owns everything, so
    a rebalance moves partitions: with librdkafka's default (eager) assignors, and with
    cooperative-sticky, whose incremental assignment the daemon must use (it once called
    ``assign()`` there, died, and exited 0). Also proves SIGTERM: each instance finishes its
    batch, commits and exits 0."""
    topic_a, topic_b = new_topic(partitions=2), new_topic(partitions=2)
    proj = projection("accounts", [topic_a, topic_b], ["handlers.accounts"], batch_max_messages=100)
    data = config_dict(services, pg_dsn, [proj])
    if strategy is not None:
        data["kafka"]["consumer"]["partition.assignment.strategy"] = strategy
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    procs = [daemon_process(path, log=tmp_path / "instance0.log")]
    try:
        wait_until(
            lambda: rows(pg_dsn, "select count(*) from projector.checkpoints") == [(4,)],
            "the first instance to own every partition",
        )
        procs.append(daemon_process(path, log=tmp_path / "instance1.log"))
        wait_until(
            lambda: (
                rows(pg_dsn, "select count(distinct owner), count(*) from projector.checkpoints")
                == [(2, 4)]
            ),
            "both instances to own partitions",
        )
        log, total = publish_split(services, topic_a, topic_b, random.Random(11), 200, 30)
        wait_until(
            lambda: (
                rows(pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints")
                == [(total,)]
            ),
            "both instances to catch up",
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=30) for proc in procs]
    assert codes == [0, 0], [(tmp_path / f"instance{i}.log").read_text()[-2000:] for i in range(2)]
    owners = rows(pg_dsn, "select owner, count(*) from projector.checkpoints group by owner")
    assert len(owners) == 2
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]


def test_instance_ids_differ_on_one_host_and_survive_restart(tmp_path: Path) -> None:
    """Proves the default static-membership id: two live processes on one host get different
    ids, and a process killed with -9 leaves its id to its restart."""
    code = (
        "import sys, time; from projector.runner.identity import instance_id;"
        " held = instance_id(None, scope=sys.argv[1]); print(held.value, flush=True); time.sleep(30)"
    )
    scope = tmp_path.name

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, scope], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    first, first_id = start()
    second, second_id = start()
    assert first_id != second_id
    first.kill()
    first.wait()
    again, again_id = start()
    assert again_id == first_id
    for proc in (second, again, first):
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_consumers_in_one_process_share_the_partitions_and_survive_kill_9(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves ``consumers: 2`` makes one process two members of the group: the partitions are
    split between the member ids ``<instance>`` and ``<instance>-c1``, which serialise on the
    streams both read (odd seqs on one topic, even on the other) as two instances do. A kill -9
    in the middle of the run and a restart lose nothing and apply nothing twice: the view
    equals the oracle. The restarted members are the same static members, so they take their
    partitions back (the session timeout is not what ends the test)."""
    topic_a, topic_b = new_topic(partitions=2), new_topic(partitions=2)
    proj = projection(
        "accounts", [topic_a, topic_b], ["handlers.accounts"], batch_max_messages=50, consumers=2
    )
    data = config_dict(services, pg_dsn, [proj], instance_id="box")
    path = write_config(tmp_path / "config.yaml", data)
    migrate_all(parse_config(data, env={}))
    log, total = publish_split(services, topic_a, topic_b, random.Random(13), 400, 25)

    def applied() -> int:
        return int(
            rows(pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints")[0][0]
        )

    proc = daemon_process(path, log=tmp_path / "run.log")
    try:
        wait_until(lambda: applied() > 0, "the first batches")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert applied() < total, "the kill came too late to prove anything"
        proc = daemon_process(path, log=tmp_path / "run.log")
        wait_until(lambda: applied() == total, "the restarted process to catch up")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    owners = rows(pg_dsn, "select distinct owner from projector.checkpoints order by owner")
    assert owners == [("box",), ("box-c1",)]
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
