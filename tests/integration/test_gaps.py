"""Gaps and replay requests against the real services, with a clock the test moves: requests
after gap_timeout with exponential back-off, the fill, the give-up policies, back-pressure at
max_parked, and one request per gap per attempt with two instances."""

from __future__ import annotations

import functools
import logging
import random
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from projector import scenarios
from projector.config import Config
from projector.runner.batch import BatchApplier
from projector.runner.daemon import run
from projector.runner.gap_timer import GapTimer
from projector.runner.worker import build_applier
from projector.source.kafka import KafkaSource
from projector.store.postgres import PostgresStore
from tests.conftest import Services
from tests.integration.gaps_harness import FakeClock, RequestReader, daemon_thread, wait_until
from tests.integration.harness import (
    daemon_process,
    make_config,
    migrate_all,
    process_config,
    projection,
    publish,
    rows,
    run_until_caught_up,
)
from tests.integration.test_pipeline import account_rows

pytestmark = pytest.mark.integration

Wire = dict[str, Any]


def split_log(
    accounts: int, events: int, withheld_seqs: set[int], seed: int = 1
) -> tuple[list[Wire], list[Wire], list[Wire]]:
    log = scenarios.account_log(random.Random(seed), accounts=accounts, events_per_account=events)
    delivered = [w for w in log if w["seq"] not in withheld_seqs]
    withheld = [w for w in log if w["seq"] in withheld_seqs]
    return log, delivered, withheld


def gap_config(services: Services, pg_dsn: str, topics: list[str], **extra: Any) -> Config:
    config = make_config(
        services, pg_dsn, [projection("accounts", topics, ["handlers.accounts"], **extra)]
    )
    migrate_all(config)
    return config


def count(pg_dsn: str, query: str) -> int:
    return int(rows(pg_dsn, query)[0][0])


def test_requests_back_off_while_nobody_answers_then_the_fill_drains(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the replay schedule with a silent write side: the first request for exactly the
    missing range comes after gap_timeout (10 s), then again after 10, 20, 40 and 40 s (capped
    at max_interval); when the events finally come the gaps fill, the parked events drain in
    order and the views equal the oracle."""
    log, delivered, withheld = split_log(accounts=5, events=8, withheld_seqs={3})
    source, requests = new_topic(partitions=2), new_topic()
    publish(services.kafka, source, delivered)
    replay = {"channel": "kafka", "topic": requests, "max_interval": "40s"}
    config = gap_config(services, pg_dsn, [source], gap_timeout="10s", replay=replay)
    clock, reader = FakeClock(), RequestReader(services.kafka, requests)
    with daemon_thread(config, clock):
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 5, "5 gaps")
        [(age,)] = rows(pg_dsn, "select max(next_request_at - first_seen) from projector.gaps")
        assert age.total_seconds() == 10
        for attempt, step in enumerate([10, 10, 20, 40, 40], start=1):
            clock.advance(step)
            got = reader.read(5 * attempt)
            assert len(got) == 5 * attempt, f"attempt {attempt}: {len(got)} requests"
        publish(services.kafka, source, withheld)
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 0, "the fill")
    reader.close()
    by_stream: dict[str, list[int]] = {}
    for r in reader.seen:
        assert (r["projection"], r["from_seq"], r["to_seq"]) == ("accounts", 3, 3)
        by_stream.setdefault(r["stream"], []).append(r["attempt"])
    assert all(attempts == [1, 2, 3, 4, 5] for attempts in by_stream.values())
    assert len(by_stream) == 5
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
    assert count(pg_dsn, "select count(*) from projector.holding") == 0


def test_an_http_endpoint_that_never_answers_does_not_hold_up_the_loop(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the HTTP channel sends off the poll loop: 100 gaps fall due while the write
    side's endpoint accepts connections and never answers (1 s timeout each, so 100 s in a
    row in the loop). Once the requests are claimed, the withheld events, published on the
    source topic, still fill every gap within seconds and the views equal the oracle."""
    log, delivered, withheld = split_log(accounts=100, events=4, withheld_seqs={2})
    source = new_topic(partitions=2)
    publish(services.kafka, source, delivered)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(512)  # connections wait in the backlog; none is ever accepted
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/replay"
        replay = {"channel": "http", "url": url, "timeout": "1s"}
        config = gap_config(services, pg_dsn, [source], gap_timeout="10s", replay=replay)
        clock = FakeClock()
        gaps = "select count(*) from projector.gaps"
        with daemon_thread(config, clock):
            wait_until(lambda: count(pg_dsn, gaps) == 100, "100 gaps")
            clock.advance(11)
            claimed = f"{gaps} where attempts = 1"
            wait_until(lambda: count(pg_dsn, claimed) == 100, "the requests claimed")
            publish(services.kafka, source, withheld)
            wait_until(lambda: count(pg_dsn, gaps) == 0, "the fill, while the POSTs wait", 15)
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)


def test_a_gap_is_requested_when_it_falls_due_not_at_the_next_check(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves the first request of a gap this instance opened goes out when the gap falls due,
    not up to a check interval (1 s here) later: gap A opens at T - 0.5 and gap B at T (10 s
    timeout); at T + 9.51 the check requests A and would next look at T + 10.51, yet at
    T + 10.02 B is requested. A replay is the slow path of a gap; this takes half an interval
    off it on average."""
    _, delivered, _ = split_log(accounts=2, events=6, withheld_seqs={3})
    first = [w for w in delivered if w["stream"] == "account:1"]
    second = [w for w in delivered if w["stream"] == "account:2"]
    source, requests = new_topic(), new_topic()
    replay = {"channel": "kafka", "topic": requests, "max_interval": "40s"}
    config = gap_config(services, pg_dsn, [source], gap_timeout="10s", replay=replay)
    clock, reader = FakeClock(), RequestReader(services.kafka, requests)
    gaps = "select count(*) from projector.gaps"
    try:
        with daemon_thread(config, clock):
            publish(services.kafka, source, first)
            wait_until(lambda: count(pg_dsn, gaps) == 1, "gap A")
            clock.advance(0.5)
            publish(services.kafka, source, second)
            wait_until(lambda: count(pg_dsn, gaps) == 2, "gap B")
            clock.advance(9.51)
            assert [r["stream"] for r in reader.read(1)] == ["account:1"]
            clock.advance(0.51)
            assert [r["stream"] for r in reader.read(2)] == ["account:1", "account:2"]
    finally:
        reader.close()


def test_gaps_falling_due_batch_after_batch_are_checked_for_together(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the checks for gaps this instance opened are spaced: on a reordered stream every
    batch opens gaps, here twenty batches 50 ms apart whose gaps fall due 50 ms apart (10 s
    timeout: checks every 1 s, spaced 0.25 s). The timer asks the store four times in that
    second, not twenty (each check is a transaction of its own, and most of those gaps are
    filled by then), and no gap is checked for more than 0.25 s after it falls due."""
    config = gap_config(services, pg_dsn, [new_topic()], gap_timeout="10s")
    migrate_all(config)
    proj = config.projections[0]
    clock = FakeClock()
    store = PostgresStore(pg_dsn)
    applier = build_applier(config, proj, store, clock)
    assert isinstance(applier, BatchApplier)
    timer = GapTimer(proj, store, applier, None, clock)
    checks: list[float] = []
    claim = store.claim_due_gaps

    def counted(*args: Any, **kwargs: Any) -> Any:
        checks.append(clock())
        return claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim_due_gaps", counted)
    start = clock()
    dues = [start + 10 + n * 0.05 for n in range(20)]
    try:
        for due in dues:
            timer.expect(due)
        for step in range(1, 221):  # the poll loop, every 50 ms for 11 s
            clock.now = start + step * 0.05
            timer.tick()
    finally:
        store.close()
    in_that_second = [c for c in checks if dues[0] <= c < dues[0] + 1]
    assert len(in_that_second) == 4, in_that_second
    for due in dues:
        assert any(due <= c <= due + 0.25 + 1e-9 for c in checks), f"{due - start:.2f} late"


def test_skip_policy_steps_over_the_gap_and_dead_letters_a_late_event(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves on_give_up: skip: after give_up_after the gap is recorded as skipped, the parked
    events behind it apply without it, and the missing event arriving later is a dead letter
    (kind skipped), counted and kept, not silently dropped nor applied."""
    log = [
        {"stream": "account:a", "seq": 1, "type": "OPENED", "ts": 1, "data": {"owner": "o"}},
        {"stream": "account:a", "seq": 2, "type": "DEPOSITED", "ts": 2, "data": {"amount": 100}},
        {"stream": "account:a", "seq": 3, "type": "DEPOSITED", "ts": 3, "data": {"amount": 5}},
    ]
    source = new_topic()
    publish(services.kafka, source, [log[0], log[2]])
    config = gap_config(
        services, pg_dsn, [source], gap_timeout="10s", give_up_after="60s", on_give_up="skip"
    )
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 1, "the gap")
        clock.advance(61)
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.holding") == 0, "the skip")
        assert rows(pg_dsn, "select from_seq, to_seq, state from projector.gaps") == [
            (2, 2, "skipped")
        ]
        assert rows(pg_dsn, "select balance, last_seq from accounts.accounts") == [(5, 3)]
        publish(services.kafka, source, [log[1]])
        wait_until(
            lambda: count(pg_dsn, "select count(*) from projector.dead_letters") == 1,
            "the late event",
        )
    assert rows(pg_dsn, "select kind, stream, seq from projector.dead_letters") == [
        ("skipped", "account:a", 2)
    ]
    assert rows(pg_dsn, "select balance, last_seq from accounts.accounts") == [(5, 3)]


def test_fail_policy_stops_the_projection_loudly(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves on_give_up: fail: past give_up_after the daemon stops with exit code 1 and a
    message naming the projection, the stream and the range; restarted, with no time passing,
    it stops again on that gap at once instead of running on as if nothing were wrong."""
    _, delivered, _ = split_log(accounts=1, events=4, withheld_seqs={2})
    source = new_topic()
    publish(services.kafka, source, delivered)
    config = gap_config(
        services, pg_dsn, [source], gap_timeout="10s", give_up_after="30s", on_give_up="fail"
    )
    clock = FakeClock()
    with daemon_thread(config, clock) as outcome:
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 1, "the gap")
        clock.advance(31)
        wait_until(lambda: "code" in outcome, "the daemon to stop")
    assert outcome["code"] == 1
    assert any(
        "gap 2-2 of stream account:" in r.getMessage() and "on_give_up: fail" in r.getMessage()
        for r in caplog.records
    )
    with daemon_thread(config, clock) as restarted:
        wait_until(lambda: "code" in restarted, "the restarted daemon to stop", limit=30)
    assert restarted["code"] == 1


def test_max_parked_only_alerts_when_replays_come_back_on_the_source_topic(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves the bound's other branch: with no replay topic, replays come back on the source
    topic, so pausing it would block the fill it waits for. Past max_parked the daemon says so
    and reads on: the whole topic is read, far more than max_parked is parked, and the
    withheld events, published on the source topic, fill every gap."""
    caplog.set_level(logging.INFO, logger="projector")
    log, delivered, withheld = split_log(accounts=100, events=10, withheld_seqs={2})
    source = new_topic()
    publish(services.kafka, source, delivered)
    config = gap_config(services, pg_dsn, [source], max_parked=100, batch_max_messages=50)
    consumed = "select coalesce(sum(next_offset), 0) from projector.checkpoints"
    with daemon_thread(config, FakeClock()):
        wait_until(lambda: count(pg_dsn, consumed) == len(delivered), "the whole topic read")
        assert count(pg_dsn, "select count(*) from projector.holding") == 100 * 8
        publish(services.kafka, source, withheld)
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.holding") == 0, "the fill")
    messages = [r.getMessage() for r in caplog.records]
    assert any("reached max_parked 100; not pausing" in m for m in messages), messages
    assert not any("pausing the source partitions until gaps fill" in m for m in messages)
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)


def test_max_parked_pauses_the_source_and_resumes_when_gaps_fill(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves back-pressure: with seq 2 of every stream withheld, parking stops near max_parked
    (the source partitions pause: far fewer parked than would arrive), the replay topic is still
    consumed, and once replays fill the gaps the holding table drains, the source resumes and
    everything ends at the oracle."""
    caplog.set_level(logging.INFO, logger="projector")
    log, delivered, withheld = split_log(accounts=100, events=10, withheld_seqs={2})
    source, replay_topic = new_topic(), new_topic()
    publish(services.kafka, source, delivered)
    config = gap_config(
        services, pg_dsn, [source], replay_topic=replay_topic, max_parked=100, batch_max_messages=50
    )
    clock = FakeClock()
    with daemon_thread(config, clock):
        wait_until(
            lambda: any("reached max_parked" in r.getMessage() for r in caplog.records),
            "back-pressure",
        )
        parked_at_pause = count(pg_dsn, "select count(*) from projector.holding")
        assert 100 <= parked_at_pause < 100 + 50 * 2, parked_at_pause
        consumed_at_pause = count(
            pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints"
        )
        assert consumed_at_pause < len(delivered)
        publish(services.kafka, replay_topic, withheld)
        wait_until(
            lambda: (
                count(pg_dsn, "select coalesce(sum(next_offset), 0) from projector.checkpoints")
                == len(delivered) + len(withheld)
            ),
            "the source to resume and be read to its end",
        )
        wait_until(
            lambda: count(pg_dsn, "select count(*) from projector.holding") == 0, "the drain"
        )
    assert any("resuming the source partitions" in r.getMessage() for r in caplog.records)
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)


def test_two_instances_send_one_request_per_gap_per_attempt(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves that with two daemon instances sharing the gaps, each gap gets exactly one
    request per attempt, not one per instance."""
    _, delivered, _ = split_log(accounts=40, events=5, withheld_seqs={3})
    source, requests = new_topic(partitions=4), new_topic()
    publish(services.kafka, source, delivered)
    replay = {"channel": "kafka", "topic": requests}
    config = gap_config(services, pg_dsn, [source], gap_timeout="10s", replay=replay)
    clock, reader = FakeClock(), RequestReader(services.kafka, requests)
    with daemon_thread(config, clock), daemon_thread(config, clock):
        wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 40, "40 gaps")
        wait_until(
            lambda: count(pg_dsn, "select count(distinct owner) from projector.checkpoints") == 2,
            "both instances to own partitions",
        )

        def all_requested(attempt: int) -> bool:
            query = f"select count(*) from projector.gaps where attempts = {attempt}"
            return count(pg_dsn, query) == 40

        for attempt in (1, 2, 3):
            clock.advance(10 * 2 ** (attempt - 1))
            reader.read(40 * attempt)
            wait_until(functools.partial(all_requested, attempt), f"attempt {attempt}")
        extra = reader.read(40 * 3 + 1, limit=1.0)
    reader.close()
    per_attempt = Counter((r["stream"], r["attempt"]) for r in extra)
    assert len(per_attempt) == 120
    assert set(per_attempt.values()) == {1}


def test_burst_run_waits_for_replays_only_when_a_channel_can_bring_them(
    services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves --exit-when-caught-up with replay channel none ends at the end of the topics
    with the gap open and visible (nothing could fill it), rather than hanging."""
    _, delivered, _ = split_log(accounts=2, events=4, withheld_seqs={2})
    source = new_topic()
    publish(services.kafka, source, delivered)
    config = gap_config(services, pg_dsn, [source])
    assert run_until_caught_up(config) == 0
    assert count(pg_dsn, "select count(*) from projector.gaps where state = 'open'") == 2


def test_a_burst_run_waiting_for_a_replay_asks_the_broker_for_its_lag_only_at_the_end(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a burst run (--exit-when-caught-up) that waits for a replay does not ask the
    broker for its exact lag meanwhile: that answer waits behind each partition's fetch
    (~0.1 s apiece), and on every idle poll it held up the loop, the replays it was waiting
    for and the requests falling due (in the bench's replay tail, one request a second
    instead of four). Here the run idles with two gaps open, the clock passes gap_timeout,
    the requests go out, the missing events are published again; the run ends, having asked
    the broker only once no gap was open."""
    _, delivered, withheld = split_log(accounts=2, events=4, withheld_seqs={2})
    source, requests = new_topic(), new_topic()
    publish(services.kafka, source, delivered)
    replay = {"channel": "kafka", "topic": requests}
    config = gap_config(services, pg_dsn, [source], gap_timeout="10s", replay=replay)
    open_gaps = "select count(*) from projector.gaps where state = 'open'"
    asked: list[int] = []  # the open gaps each time the broker was asked
    idle_polls: list[int] = []
    lag, poll = KafkaSource.lag, KafkaSource.poll

    def counted_lag(self: KafkaSource, cached: bool = True) -> dict[tuple[str, int], int]:
        if not cached:
            asked.append(count(pg_dsn, open_gaps))
        return lag(self, cached)

    def counted_poll(self: KafkaSource, max_messages: int, timeout: float) -> list[Any]:
        polled = poll(self, max_messages, timeout)
        if not polled:
            idle_polls.append(1)
        return polled

    monkeypatch.setattr(KafkaSource, "lag", counted_lag)
    monkeypatch.setattr(KafkaSource, "poll", counted_poll)
    clock, reader = FakeClock(), RequestReader(services.kafka, requests)
    outcome: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(code=run(config, exit_when_caught_up=True, clock=clock))
    )
    thread.start()
    try:
        wait_until(lambda: count(pg_dsn, open_gaps) == 2, "both gaps")
        idle_from = len(idle_polls)
        wait_until(lambda: len(idle_polls) >= idle_from + 5, "idle polls with the gaps open")
        clock.advance(10.5)
        assert len(reader.read(2)) == 2
        publish(services.kafka, source, withheld)
    finally:
        thread.join(timeout=60)
        reader.close()
    assert outcome == {"code": 0}
    assert asked and set(asked) == {0}, f"the broker was asked with gaps open: {asked}"
    assert count(pg_dsn, "select count(*) from projector.holding") == 0


def test_a_gap_keeps_its_age_across_a_kill_9_and_is_requested_on_time(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves the gap timer survives a crash: the daemon is killed with -9 right after the gaps
    open and restarted; the gaps keep their first-seen time, and the first request goes out
    gap_timeout after it (not after the restart), once per gap; the replayed events then fill
    the gaps and the burst run exits 0 at the oracle."""
    log, delivered, withheld = split_log(accounts=3, events=5, withheld_seqs={2})
    source, requests = new_topic(), new_topic()
    publish(services.kafka, source, delivered)
    replay = {"channel": "kafka", "topic": requests}
    path = process_config(
        services,
        pg_dsn,
        tmp_path,
        [projection("accounts", [source], ["handlers.accounts"], gap_timeout="3s", replay=replay)],
    )
    first = daemon_process(path, "--exit-when-caught-up")
    wait_until(lambda: count(pg_dsn, "select count(*) from projector.gaps") == 3, "3 gaps")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    seen_before = rows(pg_dsn, "select stream, first_seen from projector.gaps order by stream")
    restarted = daemon_process(path, "--exit-when-caught-up")
    reader = RequestReader(services.kafka, requests)
    got = reader.read(3, limit=20)
    assert (
        rows(pg_dsn, "select stream, first_seen from projector.gaps order by stream") == seen_before
    )
    first_seen = dict(seen_before)
    for r in got:
        asked = datetime.fromisoformat(r["requested_at"].replace("Z", "+00:00"))
        delay = (asked - first_seen[r["stream"]]).total_seconds()
        assert 3.0 <= delay < 5.0, delay
    assert sorted(r["attempt"] for r in got) == [1, 1, 1]
    assert {r["stream"] for r in got} == {w["stream"] for w in withheld}
    publish(services.kafka, source, withheld)
    assert restarted.wait(timeout=60) == 0, path.with_suffix(".log").read_text()[-3000:]
    reader.close()
    assert account_rows(pg_dsn) == scenarios.accounts_oracle(log)
