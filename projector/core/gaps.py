"""Gap records: one per contiguous missing range of a stream, carried across batches so a range
that shrinks or splits keeps when it was first seen and how often its replay was requested."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gap:
    stream: str
    from_seq: int
    to_seq: int
    first_seen: float  # epoch seconds, from the runner's clock
    attempts: int = 0
    last_request_at: float | None = None
    next_request_at: float | None = None


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
    gaps: list[Gap] = []
    inherited: set[int] = set()
    for lo, hi in ranges:
        parent = next((g for g in old if g.from_seq <= hi and lo <= g.to_seq), None)
        if parent is None:
            gaps.append(Gap(stream, lo, hi, now, next_request_at=first_request_at))
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
                )
            )
    opened = sum(
        1 for g in gaps if not any(o.from_seq <= g.to_seq and g.from_seq <= o.to_seq for o in old)
    )
    closed = sum(1 for g in old if id(g) not in inherited)
    return GapChange(stream, tuple(gaps), opened, closed)
