"""Gap records across batches, and the replay schedule."""

from __future__ import annotations

from projector.core.gaps import Gap, ReplaySchedule, decide, reconcile_gaps


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
    """Proves a gap decided skip (or fail) gets a later next request time, so a second
    instance does not take it again while the first one applies the skip."""
    due = decide(Gap("s", 3, 4, 0.0, 5), ReplaySchedule(10, 60, 100, "skip"), now=100)
    assert due.gap.next_request_at == 160
