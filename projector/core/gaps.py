"""Gap records: one per contiguous missing range of a stream, carried across batches so a range
that shrinks or splits keeps when it was first seen and how often its replay was requested; and
the replay schedule: when a gap is due, what to do about it, when to ask again.

The schedule is stored (``next_request_at``), so it survives restarts and nothing sleeps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from tenacity import RetryCallState, wait_exponential

GiveUpPolicy = Literal["hold", "skip", "fail"]


@dataclass(frozen=True, slots=True)
class Gap:
    stream: str
    from_seq: int
    to_seq: int
    first_seen: float  # epoch seconds, from the runner's clock
    attempts: int = 0
    last_request_at: float | None = None
    next_request_at: float | None = None
    state: str = "open"  # open | held (given up on, policy hold) | skipped


@dataclass(frozen=True, slots=True)
class GapChange:
    """A stream's gaps after a batch, and how many ranges opened and closed."""

    stream: str
    gaps: tuple[Gap, ...]
    opened: int
    closed: int


def reconcile_gaps(
    stream: str,
    old: Sequence[Gap],
    ranges: Sequence[tuple[int, int]],
    now: float,
    first_request_at: float | None = None,
) -> GapChange:
    """The new gap set for ``ranges``. A range inside an old gap (it shrank or split when some
    of its events arrived) inherits the old record; a range that overlaps none is new.
    ``first_request_at`` schedules a new gap's first replay request (``now + gap_timeout``)."""
    # The usual two in a reordered batch, in short: a stream's first gap opens, or its last
    # one fills.
    if not old:
        new = tuple(Gap(stream, lo, hi, now, 0, None, first_request_at) for lo, hi in ranges)
        return GapChange(stream, new, len(new), 0)
    if not ranges:
        return GapChange(stream, (), 0, len(old))
    gaps: list[Gap] = []
    inherited: set[int] = set()
    opened = 0
    for lo, hi in ranges:
        parent = parent_gap(old, lo, hi)
        if parent is None:
            gaps.append(Gap(stream, lo, hi, now, next_request_at=first_request_at))
            opened += 1
        else:
            inherited.add(id(parent))
            gaps.append(
                Gap(
                    stream,
                    lo,
                    hi,
                    parent.first_seen,
                    parent.attempts,
                    parent.last_request_at,
                    parent.next_request_at,
                    parent.state,
                )
            )
    closed = sum(1 for g in old if id(g) not in inherited)
    return GapChange(stream, tuple(gaps), opened, closed)


def parent_gap(old: Iterable[Gap], lo: int, hi: int) -> Gap | None:
    """The open or held gap of ``old`` that the missing range ``lo``-``hi`` lies in (a range
    only shrinks or splits as events arrive, so it overlaps one at most): the record it
    inherits, and, in the stores, whose schedule it takes as stored."""
    return next(
        (g for g in old if g.state != "skipped" and g.from_seq <= hi and lo <= g.to_seq), None
    )


@dataclass(frozen=True, slots=True)
class ReplaySchedule:
    """When to ask for a gap's events: first after ``gap_timeout``, then at exponentially
    growing intervals up to ``max_interval``; after ``give_up_after`` (if set) the policy."""

    gap_timeout: float
    max_interval: float
    give_up_after: float | None = None
    on_give_up: GiveUpPolicy = "hold"

    def interval_after(self, attempt: int) -> float:
        """Seconds from request number ``attempt`` (1-based) to the next one."""
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        wait = wait_exponential(multiplier=self.gap_timeout, max=self.max_interval)
        return float(wait(state))


Action = Literal["request", "skip", "fail"]


@dataclass(frozen=True, slots=True)
class Due:
    """What to do with a due gap, and its record once done (for a request: one more attempt,
    and the next request time)."""

    action: Action
    gap: Gap


def decide(gap: Gap, schedule: ReplaySchedule, now: float) -> Due:
    """The next step for a gap whose ``next_request_at`` has passed. Past ``give_up_after``,
    ``skip`` and ``fail`` act, ``hold`` keeps the gap open, visible as held, and keeps asking
    at the longest interval. Before it, the next request comes no later than the give-up
    time, so the policy acts on time, not up to ``max_interval`` late."""
    give_up_at = None if schedule.give_up_after is None else gap.first_seen + schedule.give_up_after
    given_up = give_up_at is not None and now >= give_up_at
    if given_up and schedule.on_give_up == "skip":
        # Moved out of the way so no other instance takes it while this one acts; if the
        # action fails (a crash), the gap comes due again then.
        return Due("skip", replace(gap, next_request_at=now + schedule.max_interval))
    if given_up and schedule.on_give_up == "fail":
        # Left due: every instance, and this one after a restart, stops on it at once, until
        # its events come or an operator skips it (``projector gaps skip``).
        return Due("fail", gap)
    attempt = gap.attempts + 1
    next_request_at = now + schedule.interval_after(attempt)
    if give_up_at is not None and not given_up:
        next_request_at = min(next_request_at, give_up_at)
    return Due(
        "request",
        replace(
            gap,
            attempts=attempt,
            last_request_at=now,
            next_request_at=next_request_at,
            state="held" if given_up else gap.state,
        ),
    )
