"""Gap records across batches, and the replay schedule."""

from __future__ import annotations

from projector.core.gaps import Gap, GiveUpPolicy, ReplaySchedule, decide, reconcile_gaps


def test_new_gap_is_scheduled_after_the_timeout() -> None:
    """Proves a gap first seen at t=100 is first requested at t=100 + gap_timeout."""
    change = reconcile_gaps("s", [], [(3, 4)], now=100.0, first_request_at=130.0)
    assert change.gaps == (Gap("s", 3, 4, 100.0, next_request_at=130.0),)
    assert (change.opened, change.closed) == (1, 0)


def test_shrunk_or_split_gap_keeps_its_age_and_schedule() -> None:
    """Proves a gap 3-9 that loses seq 6 becomes 3-5 and 7-9, both keeping first seen, attempts
    and next request time; one that fills completely is closed."""
    old = [Gap("s", 3, 9, 10.0, 2, 50.0, 90.0), Gap("s", 20, 21, 15.0)]
    change = reconcile_gaps("s", old, [(3, 5), (7, 9)], now=100.0, first_request_at=130.0)
    assert [
        (g.from_seq, g.to_seq, g.first_seen, g.attempts, g.next_request_at) for g in change.gaps
    ] == [
        (3, 5, 10.0, 2, 90.0),
        (7, 9, 10.0, 2, 90.0),
    ]
    assert (change.opened, change.closed) == (0, 1)


def test_requests_back_off_exponentially_up_to_the_limit() -> None:
    """Proves the schedule: gap_timeout 10 s → intervals 10, 20, 40, 80, then capped at 60."""
    schedule = ReplaySchedule(gap_timeout=10, max_interval=60)
    assert [schedule.interval_after(n) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_decide_requests_and_records_the_attempt() -> None:
    """Proves a due gap gets a request: attempts + 1, last request now, next at now + interval."""
    due = decide(Gap("s", 3, 4, 0.0, 1, 10.0, 20.0), ReplaySchedule(10, 600), now=20.0)
    assert due.action == "request"
    assert (due.gap.attempts, due.gap.last_request_at, due.gap.next_request_at) == (2, 20.0, 40.0)


def test_give_up_policies() -> None:
    """Proves past give_up_after: skip and fail act, hold keeps asking and marks the gap held."""
    gap = Gap("s", 3, 4, 0.0, 5)
    assert decide(gap, ReplaySchedule(10, 60, 100, "skip"), now=100).action == "skip"
    assert decide(gap, ReplaySchedule(10, 60, 100, "fail"), now=100).action == "fail"
    held = decide(gap, ReplaySchedule(10, 60, 100, "hold"), now=100)
    assert (held.action, held.gap.state, held.gap.next_request_at) == ("request", "held", 160)
    assert decide(gap, ReplaySchedule(10, 60, 100, "skip"), now=99).action == "request"


def test_a_gap_given_up_on_is_moved_out_of_the_way_while_acted_on() -> None:
    """Proves a gap decided skip gets a later next request time, so a second instance does
    not take it again while the first one applies the skip."""
    due = decide(Gap("s", 3, 4, 0.0, 5), ReplaySchedule(10, 60, 100, "skip"), now=100)
    assert due.gap.next_request_at == 160


def test_a_gap_failed_on_stays_due_so_a_restart_fails_at_once() -> None:
    """Proves on_give_up: fail keeps the gap due: the daemon restarted after the failure (or
    another instance) stops on it at its first check, instead of running on for up to
    max_interval as if nothing were wrong."""
    gap = Gap("s", 3, 4, 0.0, 5, 90.0, 100.0)
    due = decide(gap, ReplaySchedule(10, 600, 100, "fail"), now=100)
    assert due.action == "fail" and due.gap == gap
    assert decide(due.gap, ReplaySchedule(10, 600, 100, "fail"), now=101).action == "fail"


def test_the_policy_acts_at_give_up_after_not_at_the_next_backoff() -> None:
    """Proves the give-up time bounds the schedule: gap_timeout 2 s and give_up_after 10 s ask
    at 2, 4 and 8 s, then act at 10 s (the backoff alone would say 16 s), for every policy:
    skip and fail act, hold marks the gap held."""
    cases: list[tuple[GiveUpPolicy, str]] = [
        ("skip", "skip"),
        ("fail", "fail"),
        ("hold", "request"),
    ]
    for policy, action in cases:
        schedule = ReplaySchedule(
            gap_timeout=2, max_interval=600, give_up_after=10, on_give_up=policy
        )
        gap = Gap("s", 3, 4, first_seen=0.0, next_request_at=2.0)
        asked = []
        while True:
            assert gap.next_request_at is not None
            due = decide(gap, schedule, now=gap.next_request_at)
            if due.action != "request" or due.gap.state == "held":
                break
            asked.append(gap.next_request_at)
            gap = due.gap
        assert asked == [2.0, 4.0, 8.0]
        assert (due.action, gap.next_request_at) == (action, 10.0)
