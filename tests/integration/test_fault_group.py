"""Fault scenarios in one consumer group, with every daemon a real ``projector run`` process
against the real Kafka and PostgreSQL: instances killed with -9 and added under load, and an
instance whose handler stalls past ``max.poll.interval.ms``. Each run is compared row by row
with the oracle folded from the complete ordered log, and the stored checkpoints are sampled
every 100 ms all along to prove they never go back."""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from projector import scenarios
from projector.config import parse_config
from tests.conftest import Services
from tests.integration.fault_fleet import (
    FENCED,
    REVOKED,
    CheckpointSampler,
    Fleet,
    Row,
    TopicPartition,
    committed,
    compare_accounts,
    end_offsets,
    fleet,
    fresh_database,
    fresh_topics,
    owners,
)
from tests.integration.fault_run import ASSIGNED, wait_for
from tests.integration.harness import config_dict, migrate_all, projection, publish, rows
from tests.integration.test_pipeline import account_rows

pytestmark = [pytest.mark.integration, pytest.mark.fault]

Wire = dict[str, Any]
PARTITIONS = 8
SESSION_TIMEOUT_MS = 6000


def shuffled_accounts(seed: int, accounts: int, events: int) -> tuple[list[Wire], list[Wire]]:
    """The ordered account log and that log as delivered: shuffled within windows of 200 and
    3% duplicated (each copy somewhere after its original)."""
    rng = random.Random(seed)
    log = scenarios.account_log(rng, accounts=accounts, events_per_account=events)
    delivered = scenarios.with_duplicates(
        rng, scenarios.shuffle_within_windows(rng, log, 200), 0.03
    )
    return log, delivered


def group_config(
    services: Services, pg_dsn: str, topic: str, consumer: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    data = config_dict(
        services,
        pg_dsn,
        [projection("accounts", [topic], ["handlers.accounts"], **extra)],
    )
    data["kafka"]["consumer"] = {
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": 500,
        **consumer,
    }
    return data


@pytest.mark.parametrize(
    "strategy",
    [
        "roundrobin",
        "cooperative-sticky",
    ],
)
def test_three_instances_one_killed_one_added_under_load(
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    strategy: str,
) -> None:
    """Proves exactly-once across rebalances with real processes, for an eager assignor
    (roundrobin) and for cooperative-sticky: three instances (static members a, b, c) share an
    8-partition topic carrying 60,000 account events shuffled within windows of 200 and 3%
    duplicated, published in parts while they run; once a fifth of it is applied, b is killed
    with -9 (its partitions move when its session expires), and a fourth instance with a new
    group.instance.id (d) joins and applies its share of the rest. Sampled every 100 ms all along, no stored checkpoint
    (offset or epoch) ever goes back; at the end every checkpoint is at its partition's end,
    every accounts row equals the oracle folded from the ordered log (the per-row apply
    counter shows none applied twice), nothing is parked, and a, c, d exit 0 on SIGTERM."""
    seed = 1000 + len(strategy)
    log, delivered = shuffled_accounts(seed, accounts=3000, events=20)
    total = len(delivered)
    topic = new_topic(partitions=PARTITIONS)
    data = group_config(
        services,
        pg_dsn,
        topic,
        {"partition.assignment.strategy": strategy},
        batch_max_messages=250,
    )
    migrate_all_from(data)
    started = time.monotonic()
    with fleet(data, tmp_path) as f, CheckpointSampler(pg_dsn, "accounts") as sampler:
        figures: dict[str, Any] = {"seed": seed, "events": total, "partitions": PARTITIONS}
        figures |= _kill_one_add_one(services, pg_dsn, topic, f, delivered, random.Random(seed))
        codes = {n: f[n].stop() for n in ("a", "c", "d")}
        logs = f.logs()
    found = compare_accounts(account_rows(pg_dsn), scenarios.accounts_oracle(log))
    regressions = sampler.regressions()
    figures |= {
        "assigned_lines": f.count(ASSIGNED),
        "revoked_lines": f.count(REVOKED),
        "claims": sum(epoch for _, epoch, _ in sampler.current().values()),
        "fenced_batches": f.count(FENCED),
        "d_batches": batches(f["d"].text()),
        "checkpoint_samples": len(sampler.samples),
        "checkpoint_regressions": len(regressions),
        "applied_twice": found.applied_twice,
        "rows": found.rows,
        "rows_differing": found.differing,
        "exit_codes": codes,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"FIGURES three-instances-{strategy}:", figures)

    assert not sampler.errors, sampler.errors
    assert figures["backlog_at_kill"] > 0, "b was killed with nothing left to do"
    assert figures["d_batches"] > 1, "d applied (almost) nothing"
    assert not regressions, regressions[:10]
    assert len(sampler.samples) > 50
    assert found.applied_twice == 0
    assert found.equal, found.examples
    assert codes == {"a": 0, "c": 0, "d": 0}, logs
    assert committed(pg_dsn, "accounts") == total
    assert rows(pg_dsn, "select count(*) from projector.holding") == [(0,)]
    # Three joins, a takeover and a fourth join: every instance saw at least one assignment,
    # and the survivors more than one.
    assert figures["assigned_lines"] >= 6, logs
    assert figures["revoked_lines"] >= 2, logs


def _kill_one_add_one(
    services: Services,
    dsn: str,
    topic: str,
    f: Fleet,
    delivered: list[Wire],
    rng: random.Random,
) -> dict[str, Any]:
    """Start a, b, c; publish 40%; kill b -9 once a fifth of all is applied; publish 20%; once
    b's partitions are taken over, start d and publish 20%; once d owns partitions, the last
    20%; wait for the end. Each step ends on what the checkpoints table shows."""
    total = len(delivered)
    cuts = [0, total * 2 // 5, total * 3 // 5, total * 4 // 5, total]
    parts = [delivered[lo:hi] for lo, hi in itertools.pairwise(cuts)]
    for name in ("a", "b", "c"):
        f.start(name)

    def alive() -> None:
        f.check_alive([n for n in f.instances if n != "b"])

    def held_by() -> set[str]:
        return set(owners(dsn, "accounts").values())

    trio = {"fault-a", "fault-b", "fault-c"}
    wait_for(lambda: held_by() == trio, "a, b and c to own partitions", 90, alive)
    publish(services.kafka, topic, parts[0])
    wait_for(lambda: committed(dsn, "accounts") >= total // 5, "a fifth applied", 120, alive)
    time.sleep(rng.uniform(0, 0.05))  # the kill's moment, anywhere in a batch; not a sync
    f["b"].kill9()
    at_kill, killed_at = committed(dsn, "accounts"), time.monotonic()
    publish(services.kafka, topic, parts[1])
    # b's partitions move once the broker gives up on its session.
    wait_for(lambda: "fault-b" not in held_by(), "b's partitions taken over", 120, alive)
    takeover = time.monotonic() - killed_at
    f.start("d")
    publish(services.kafka, topic, parts[2])
    wait_for(lambda: "fault-d" in held_by(), "d to own partitions", 120, alive)
    at_join = committed(dsn, "accounts")
    publish(services.kafka, topic, parts[3])
    wait_for(lambda: committed(dsn, "accounts") == total, "everything applied", 240, alive)
    return {
        "backlog_at_kill": cuts[1] - at_kill,
        "takeover_s": round(takeover, 1),
        "backlog_at_join": cuts[3] - at_join,
    }


def batches(log_text: str) -> int:
    """How many batches the daemon applied, from its last words ("stopped after N batches")."""
    found = re.findall(r"stopped after (\d+) batches", log_text)
    return int(found[-1]) if found else -1


def migrate_all_from(data: dict[str, Any]) -> None:
    migrate_all(parse_config(data, env={}))


# -------------------------------------------------------------- a handler stalled past max.poll

STALL_SEED = 2024
MAX_POLL_MS = 10_000
STALL_SESSION_MS = 6_000
STUCK_AFTER = 30.0  # a partition behind its end that has not moved for this long is stuck


@dataclass
class StallRun:
    """What the stall scenario saw, for the tests to judge."""

    log: list[Wire]
    total: int
    at: dict[str, float] = field(default_factory=dict)
    stalled_on: set[TopicPartition] = field(default_factory=set)
    fenced: int = 0
    rejoins: int = 0
    behind: dict[str, tuple[str, int]] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    regressions: list[str] = field(default_factory=list)
    sampler_errors: list[str] = field(default_factory=list)
    found: dict[str, Row] = field(default_factory=dict)
    parked: int = -1
    logs: str = ""

    def mark(self, name: str) -> None:
        self.at[name] = time.monotonic()

    def since(self, name: str, start: str = "stalled") -> float:
        return round(self.at[name] - self.at[start], 1)

    def figures(self) -> dict[str, Any]:
        found = compare_accounts(self.found, scenarios.accounts_oracle(self.log))
        return {
            "seed": STALL_SEED,
            "events": self.total,
            "max_poll_ms": MAX_POLL_MS,
            "session_ms": STALL_SESSION_MS,
            "maxpoll_logged_after_s": self.since("maxpoll"),
            "group_rebalanced_after_s": self.since("rebalanced"),
            "b_owns_all_after_s": self.since("taken_over"),
            "stall_s": self.since("released"),
            "fenced_batches": self.fenced,
            "fenced_after_wake_s": self.since("fenced", "released"),
            "rejoined_after_wake_s": self.since("rejoined", "released"),
            "assignments_after_wake": self.rejoins,
            "caught_up": "caught_up" in self.at,
            "partitions_behind": self.behind,
            "checkpoint_regressions": len(self.regressions),
            "applied_twice": found.applied_twice,
            "rows_ahead_or_wrong": len(rows_off_the_log(self.found, self.log)),
            "rows_differing": found.differing,
            "exit_codes": self.codes,
            "seconds": round(self.at["stopped"] - self.at["started"], 1),
        }


def rows_off_the_log(found: dict[str, Row], log: list[Wire]) -> list[str]:
    """Accounts whose row is not the oracle of a prefix of their stream (the prefix up to the
    row's own last_seq): ahead of the log, wrong, or applied twice. A row merely behind (its
    partition not read to the end) is on the log."""
    last = {f"account:{i}": int(r["last_seq"]) for i, r in found.items()}
    oracle = scenarios.accounts_oracle([w for w in log if w["seq"] <= last.get(w["stream"], 0)])
    return sorted(i for i in set(found) | set(oracle) if found.get(i) != oracle.get(i))


def run_stall(services: Services, dsn: str, topic: str, tmp: Path) -> StallRun:
    log, delivered = shuffled_accounts(STALL_SEED, accounts=1500, events=20)
    run = StallRun(log, len(delivered))
    data = group_config(
        services,
        dsn,
        topic,
        {"max.poll.interval.ms": MAX_POLL_MS, "session.timeout.ms": STALL_SESSION_MS},
        batch_max_messages=200,
    )
    data["projections"][0]["handlers"] = ["tests.integration.stall_handler"]
    # Below max.poll.interval.ms: b claims a's partitions inside its rebalance callback and
    # waits this long on a's stuck transaction before ending it.
    data["postgres"]["idle_in_transaction_timeout"] = "5s"
    migrate_all_from(data)
    run.mark("started")
    with fleet(data, tmp) as f, CheckpointSampler(dsn, "accounts") as sampler:
        try:
            _stall_phases(run, services, dsn, topic, f, sampler, delivered, tmp / "stall")
        finally:
            run.logs = f.logs()
        run.codes = {n: f[n].stop() for n in ("a", "b")}
    run.mark("stopped")
    run.regressions, run.sampler_errors = sampler.regressions(), sampler.errors
    run.found = account_rows(dsn)
    [(run.parked,)] = rows(dsn, "select count(*) from projector.holding")
    return run


def _stall_phases(
    run: StallRun,
    services: Services,
    dsn: str,
    topic: str,
    f: Fleet,
    sampler: CheckpointSampler,
    delivered: list[Wire],
    stall: Path,
) -> None:
    """Each phase ends on what the log, the checkpoints table or the sampler shows."""
    a = f.start("a", env={"PROJECTOR_TEST_STALL_FILE": str(stall)})
    b = f.start("b")

    def alive() -> None:
        f.check_alive(["a", "b"])

    def held_by() -> set[str]:
        return set(owners(dsn, "accounts").values())

    parts = [run.total * 2 // 5, run.total * 7 // 10]
    wait_for(lambda: held_by() == {"fault-a", "fault-b"}, "a and b to own", 90, alive)
    publish(services.kafka, topic, delivered[: parts[0]])
    wait_for(lambda: committed(dsn, "accounts") >= run.total // 10, "progress", 120, alive)
    stall.touch()  # the fault: a's next batch stalls in its handler, mid-transaction
    b_revoked = b.count(REVOKED)
    publish(services.kafka, topic, delivered[parts[0] : parts[1]])
    wait_for(lambda: "stall_handler: stalled" in a.text(), "a to stall", 60, alive)
    run.mark("stalled")
    run.stalled_on = {tp for tp, o in owners(dsn, "accounts").items() if o == "fault-a"}
    before = {tp: sampler.current()[tp][0] for tp in run.stalled_on}
    wait_for(lambda: b.count(REVOKED) > b_revoked, "the group to rebalance", 90, alive)
    run.mark("rebalanced")
    wait_for(lambda: held_by() == {"fault-b"}, "b to take a's partitions over", 90, alive)
    run.mark("taken_over")
    wait_for(
        lambda: any(sampler.current()[tp][0] > before[tp] for tp in run.stalled_on),
        "b to apply a's share",
        60,
        alive,
    )
    seen = len(a.text())
    stall.unlink()  # the stall ends
    run.mark("released")
    wait_for(lambda: a.count(FENCED, seen), "a to be fenced", 60, alive)
    run.mark("fenced")
    # librdkafka's log lines go through projector's logging, handed over in poll: a's
    # MAXPOLL line shows once its loop polls again, after the stall.
    wait_for(lambda: "MAXPOLL" in a.text(), "a's MAXPOLL log line", 60, alive)
    run.mark("maxpoll")
    wait_for(lambda: "fault-a" in held_by(), "a to rejoin and claim", 90, alive)
    run.mark("rejoined")
    publish(services.kafka, topic, delivered[parts[1] :])
    ends = end_offsets(services.kafka, topic)
    published = time.monotonic()
    outcome = wait_for(
        lambda: finished(sampler, ends, published), "the end, or a partition stuck", 180, alive
    )
    if outcome == "caught up":
        run.mark("caught_up")
    run.behind = {
        f"{t}[{p}]": (owner, ends[(t, p)] - offset)
        for (t, p), (offset, _, owner) in sampler.current().items()
        if offset < ends[(t, p)]
    }
    run.fenced, run.rejoins = a.count(FENCED, seen), a.count(ASSIGNED, seen)


def finished(
    sampler: CheckpointSampler, ends: dict[TopicPartition, int], since: float
) -> str | None:
    """ "caught up" when every checkpoint is at its end; "stuck" when a partition behind its end
    has not moved for STUCK_AFTER seconds, all of them after ``since`` (when its last events
    were published); else None (keep waiting)."""
    now = sampler.current()
    behind = {tp for tp, (offset, _, _) in now.items() if offset < ends[tp]}
    if not behind:
        return "caught up"
    then = [v for t, v in sampler.samples if since <= t <= time.monotonic() - STUCK_AFTER]
    if then and any(then[-1][tp][0] == now[tp][0] for tp in behind if tp in then[-1]):
        return "stuck"
    return None


@pytest.fixture(scope="module")
def stall_run(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StallRun]:
    """The stall scenario, once for the tests below; its figures printed."""
    tmp = tmp_path_factory.mktemp("stall")
    with fresh_database(services) as dsn, fresh_topics(services, source=4) as topics:
        run = run_stall(services, dsn, topics["source"], tmp)
        print("FIGURES stalled-past-max-poll:", run.figures())
        yield run


def test_a_handler_stalled_past_max_poll_interval_is_fenced(stall_run: StallRun) -> None:
    """Proves fencing of a live but stalled instance with real processes: instances a and b
    (static members; max.poll.interval.ms 10 s, session.timeout.ms 6 s) share a 4-partition
    topic carrying 30,000 shuffled, 3%-duplicated account events; a's handler stalls inside
    its batch transaction (tests/integration/stall_handler.py: stalled while a file the test
    creates exists) while events keep arriving. librdkafka notices at max.poll.interval.ms,
    b gets every partition once the broker expires a's static membership, claims them (ending
    a's session stuck mid-transaction after idle_in_transaction_timeout) and applies a's
    share. When the file is removed, a's batch in flight is refused by the store-side epoch
    fence (its "fenced" warning) and a rejoins the group and claims partitions again. Sampled
    every 100 ms, no checkpoint (offset or epoch) ever goes back; nothing is applied twice
    and no accounts row is ahead of, or off, the oracle of its stream's log; both exit 0."""
    run = stall_run
    figures = run.figures()
    assert not run.sampler_errors, run.sampler_errors
    assert not run.regressions, run.regressions[:10]
    assert run.fenced >= 1, run.logs
    assert run.rejoins >= 1, run.logs
    assert figures["applied_twice"] == 0
    assert rows_off_the_log(run.found, run.log) == []
    assert run.codes == {"a": 0, "b": 0}, run.logs


def test_a_fenced_instance_that_rejoins_goes_on_applying(stall_run: StallRun) -> None:
    """Proves a fenced instance recovers by itself: after the stall above, the partitions a
    gets back when it rejoins are read to their end (none is left behind, not moving for 30
    s), and the accounts equal the oracle folded from the ordered log, nothing parked."""
    run = stall_run
    assert "caught_up" in run.at, f"partitions left behind (owner, lag): {run.behind}"
    assert compare_accounts(run.found, scenarios.accounts_oracle(run.log)).equal
    assert run.parked == 0
