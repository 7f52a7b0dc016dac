"""Several instances, each hit again and again: three ``projector run`` processes in one
consumer group, on PostgreSQL and on Redis, killed with -9 (started again at once or after
their session expired) or frozen past their session at random moments, while the gaps of
withheld events are filled by replays that come back on a replay topic of one partition. So
the instance that holds that partition applies events of streams the others own (on Redis:
the others' cached stream hashes go stale, and their batches are refused and planned again;
on PostgreSQL: they wait for each other's row locks), every instance's gap timer decides the
same gaps, partitions move, and a frozen instance wakes up to write with an epoch that is no
longer current. The run must end as one instance would end it.

Run with ``.venv/bin/pytest -m fault -s tests/integration/test_fault_instances.py``; the
figures are printed on a line starting with ``FIGURES``. ``PROJECTOR_FAULT_SEED`` changes the
seed.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Services
from tests.integration.fault_fleet import FENCED, REVOKED, Fleet, fleet
from tests.integration.fault_run import (
    Workload,
    compare_shop,
    figures,
    replay_responder,
    shop_workload,
    wait_for,
)
from tests.integration.harness import projection, publish
from tests.integration.redis_server import RedisServers
from tests.integration.test_fault_crashes import HANDLERS, SEED, EndState, store_config

pytestmark = pytest.mark.integration

INSTANCES = ("a", "b", "c")
FAULTS = 12
SESSION_TIMEOUT_MS = 6000
REQUESTED = re.compile(r"requested replay of (\d+) gap")
REFUSED = re.compile(r"changed what the batch read|planned on from memory were written")


def _faults(
    f: Fleet,
    publish_part: Callable[[int], int],
    committed: Callable[[], int],
    rng: random.Random,
    count: int,
) -> dict[str, list[object]]:
    """``count`` times: publish the next part of the workload, wait until a random point of it
    is committed, wait a random moment, and hit a random instance with a random fault:

    - ``kill``: kill -9, started again at once (it gets its partitions back: static
      membership);
    - ``kill, down``: kill -9, started again only after its session expired, so that its
      partitions moved to the others meanwhile;
    - ``frozen``: SIGSTOP past its session (its partitions move while it holds a batch in
      hand, maybe its commit in flight), then SIGCONT: what it then writes must be fenced.

    Then publish the last part. Published part by part, the run cannot end before the last
    fault."""
    seen: dict[str, list[object]] = {"faults": [], "committed_at_faults": []}

    def alive() -> None:
        f.check_alive(list(INSTANCES))

    published = 0
    for part in range(count):
        size = publish_part(part)
        goal = published + rng.randrange(size // 4, size * 3 // 4)
        published += size
        wait_for(lambda: committed() >= goal, f"{goal} committed", 240, alive, every=0.02)  # noqa: B023
        time.sleep(rng.uniform(0, 0.05))  # the fault's moment, not a synchronisation
        victim, fault = rng.choice(INSTANCES), rng.choice(("kill", "kill, down", "frozen"))
        others = [n for n in INSTANCES if n != victim]
        if fault == "frozen":
            f[victim].freeze()
        else:
            f[victim].kill9()
        seen["committed_at_faults"].append(committed())
        if fault != "kill":
            f.check_alive(others)
            time.sleep(SESSION_TIMEOUT_MS / 1000 + 1)  # the outage itself, not a sync
        if fault == "frozen":
            f[victim].thaw()
        else:
            f[victim].start()
        seen["faults"].append(f"{victim}: {fault}")
    publish_part(count)
    return seen


@dataclass
class Run:
    """One run of the scenario: the workload published in ``faults + 1`` parts to three
    instances of one projection, with the reference responder serving its replays."""

    kind: str
    seed: int
    work: Workload
    faults: int
    services: Services
    pg_dsn: str
    new_topic: Callable[..., str]
    tmp_path: Path
    redis_servers: RedisServers

    def go(self, name: str) -> dict[str, Any]:
        """Run it to its end state, stop the instances, and return the figures (printed)."""
        work, services, total = self.work, self.services, len(self.work.delivered)
        rng = random.Random(self.seed)
        source, requests, replays = (
            self.new_topic(partitions=6),
            self.new_topic(),
            self.new_topic(),
        )
        cuts = [total * i // (self.faults + 1) for i in range(self.faults + 2)]

        def publish_part(part: int) -> int:
            wires = work.delivered[cuts[part] : cuts[part + 1]]
            publish(services.kafka, source, wires)
            return len(wires)

        shop = projection(
            "shop",
            [source],
            HANDLERS[self.kind],
            store=self.kind,
            batch_max_messages=200,
            gap_timeout="500ms",
            replay={"channel": "kafka", "topic": requests, "max_interval": "2s"},
            replay_topic=replays,
        )
        data, probe = store_config(self.kind, services, self.pg_dsn, self.redis_servers, shop)
        data["kafka"]["consumer"] = {
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 500,
        }
        done = EndState(0, 0, 0, total)
        started = time.monotonic()
        with (
            closing(probe),
            replay_responder(services.kafka, self.pg_dsn, work.log, requests, replays),
            fleet(data, self.tmp_path) as f,
        ):
            for instance in INSTANCES:
                f.start(instance)
            seen = _faults(f, publish_part, probe.committed, rng, self.faults)
            wait_for(
                lambda: probe.end_state() == done,
                f"the end state {done}",
                240,
                lambda: f.check_alive(list(INSTANCES)),
            )
            codes = {n: f[n].stop() for n in INSTANCES}
            seconds = time.monotonic() - started
            compared = compare_shop(probe.views, "shop", work.log)
            values = {
                "store": self.kind,
                "seed": self.seed,
                "events": len(work.log),
                "delivered": total,
                "withheld": len(work.withheld),
                "streams": compared.streams,
                **seen,
                "replay_requests_by_instance": {
                    n: sum(map(int, REQUESTED.findall(f[n].text()))) for n in INSTANCES
                },
                "batches_refused_and_planned_again": f.count(REFUSED),
                "revokes": f.count(REVOKED),
                "fenced_batches": f.count(FENCED),
                "streams_equal_pct": compared.percent_equal,
                "applied_twice": compared.applied_twice,
                "end": probe.end_state(),
                "exit_codes": codes,
                "seconds": round(seconds, 1),
            }
            figures(name, values)
            assert compared.all_equal, compared.examples
            assert codes == dict.fromkeys(INSTANCES, 0), f.logs()
        return values

    def check(self, values: dict[str, Any]) -> None:
        assert values["applied_twice"] == 0
        assert values["end"] == EndState(0, 0, 0, len(self.work.delivered))
        assert len(values["faults"]) == self.faults
        requested = values["replay_requests_by_instance"]
        assert self.work.withheld and sum(1 for n in requested.values() if n) >= 2, requested


MakeRun = Callable[[str, int, Workload, int], Run]


@pytest.fixture
def make_run(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    redis_servers: RedisServers,
) -> MakeRun:
    """``make_run(kind, seed, work, faults)``: a ``Run`` on the test's services."""

    def make(kind: str, seed: int, work: Workload, faults: int) -> Run:
        return Run(kind, seed, work, faults, services, pg_dsn, new_topic, tmp_path, redis_servers)

    return make


@pytest.mark.fault
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_three_instances_killed_and_frozen_again_and_again_while_replays_fill_gaps(
    kind: str, make_run: MakeRun
) -> None:
    """Proves exactly-once with several instances under repeated faults and replays, on
    each store: about 40,000 customer and game events (about 4,000 streams) reach a
    6-partition topic shuffled within windows of 100, 1% duplicated, 0.2% withheld (the
    reference responder serves them on the one-partition replay topic when a gap asks),
    published in thirteen parts as the run goes. Three instances (static members) apply it
    in batches of at most 200; after each of the first twelve parts one of them, at random,
    is hit at a random moment of that part by a random fault (``_faults``). Then: every
    stream equals the oracle (100%), the per-row apply counters show no event applied twice,
    nothing is parked, no gap and no dead letter is left, the source checkpoints stand at
    the end of the topic, and every instance exits 0 on SIGTERM. Replays must have been
    asked for, by more than one instance."""
    seed = SEED + (10 if kind == "postgres" else 11)
    work = shop_workload(seed, customers=3600, games=300, duplicates=0.01, withheld=0.002)
    run = make_run(kind, seed, work, FAULTS)
    run.check(run.go(f"instances[{kind}]"))


@pytest.mark.timeout(300)
def test_three_redis_instances_killed_and_frozen_while_replays_fill_gaps(
    make_run: MakeRun,
) -> None:
    """The scenario above, short, for the default suite, on Redis (whose instances refuse
    each other's batches planned on stale stream hashes; PostgreSQL's share the partitions
    in ``test_instances.py``): about 10,000 events (about 1,000 streams), 0.5% withheld,
    published in five parts, four faults."""
    seed = SEED + 12
    work = shop_workload(seed, customers=900, games=75, duplicates=0.01, withheld=0.005)
    run = make_run("redis", seed, work, 4)
    run.check(run.go("instances-short[redis]"))
