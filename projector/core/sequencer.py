"""Sequence mode: decides, per stream, what to apply, park, drain, drop or reject.

Pure: it takes a stream's stored position, its parked events and the batch's incoming events,
and returns a plan. The store executes the plan in the batch transaction; nothing here does I/O.

Rules (``last`` = last applied seq, ``first`` = the configured first seq):
- ``seq == last + 1`` is applied, then parked successors drain in order;
- ``seq <= last`` is a duplicate, dropped and counted; at ``seq == last`` with a different
  payload it is a conflict (dead letter);
- ``last + 1 < seq <= last + max_seq_jump`` is parked; the same seq parked twice with a
  different payload is a conflict;
- a larger jump, or ``seq < first``, is rejected (dead letter).
A stream whose next event was dead-lettered (``blocked_seq``) applies nothing until the dead
letter is retried or skipped; its later events are parked meanwhile. A gap given up on with the
``skip`` policy is a skipped range: the stream steps over it, and an event that arrives later for
it is rejected (counted and dead-lettered, never silently dropped).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from projector.core.event import Event
from projector.core.seq_ranges import SeqRanges


@dataclass(frozen=True, slots=True)
class SequenceRules:
    first_seq: int = 1
    max_seq_jump: int = 100_000


class StreamPosition(NamedTuple):
    """A stream's stored progress. ``last_seq`` is ``first_seq - 1`` before anything applied.
    A named tuple, like the plan below: a batch makes a few per stream, and a tuple is built
    in less than half the time of a frozen dataclass."""

    stream: str
    last_seq: int
    last_id: str | None = None
    last_hash: str | None = None
    blocked_seq: int | None = None

    @classmethod
    def new(cls, stream: str, rules: SequenceRules) -> StreamPosition:
        return cls(stream, rules.first_seq - 1)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event the sequencer will not apply: it becomes a dead letter with this reason."""

    event: Event
    kind: str
    reason: str


class StreamPlan(NamedTuple):
    stream: str
    position: StreamPosition
    apply: tuple[Event, ...] = ()
    park: tuple[Event, ...] = ()
    unpark: tuple[int, ...] = ()
    duplicates: int = 0
    rejected: tuple[Rejection, ...] = ()
    gaps: tuple[tuple[int, int], ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.apply or self.park or self.unpark or self.rejected)


@dataclass(slots=True)
class _Work:
    """Mutable scratch state while one stream's incoming events are folded in."""

    position: StreamPosition
    parked: dict[int, Event]  # the parked events loaded: every one this batch can meet
    parked_seqs: SeqRanges  # every seq in the holding table, loaded or not
    skipped: Sequence[tuple[int, int]] = ()
    new_parked: dict[int, Event] = field(default_factory=dict)
    apply: list[Event] = field(default_factory=list)
    unpark: list[int] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    last_applied: Event | None = None  # the event ``position`` stands at, if applied here

    def held(self, seq: int) -> Event | None:
        if seq in self.new_parked:
            return self.new_parked[seq]
        return self.stored_parked(seq) if seq in self.parked_seqs else None

    def stored_parked(self, seq: int) -> Event:
        event = self.parked.get(seq)
        if event is None:  # a caller's bug: parked_needed says what to load
            raise ValueError(f"parked event {seq} of {self.position.stream} was not loaded")
        return event

    def advance(self, event: Event) -> None:
        self.apply.append(event)
        p = self.position
        # The hash is filled in once, for the stream's last applied event (see ``final``).
        self.position = StreamPosition(p.stream, p.last_seq + 1, event.id, None, p.blocked_seq)
        self.last_applied = event

    def last_hash_matches(self, event: Event) -> bool:
        if self.last_applied is not None:
            return self.last_applied.hash == event.hash
        stored = self.position.last_hash
        return stored is None or event.same_payload(stored)

    def final(self) -> StreamPosition:
        if self.last_applied is None:
            return self.position
        p = self.position
        return StreamPosition(
            p.stream, p.last_seq, p.last_id, self.last_applied.hash, p.blocked_seq
        )

    def skipped_range(self, seq: int) -> tuple[int, int] | None:
        return _skipped_range(self.skipped, seq)

    def drain(self) -> None:
        # A blocked stream drains up to, never past, its dead-lettered seq.
        blocked = self.position.blocked_seq
        while (nxt := self.position.last_seq + 1) != blocked:
            if nxt in self.new_parked:
                self.advance(self.new_parked.pop(nxt))
            elif nxt in self.parked_seqs:
                self.advance(self.stored_parked(nxt))
                self.parked_seqs.discard(nxt)
                self.unpark.append(nxt)
            elif (skip := self.skipped_range(nxt)) is not None:
                self.position = self.position._replace(
                    last_seq=skip[1], last_id=None, last_hash=None
                )
                self.last_applied = None
            else:
                return


def sequence_stream(
    position: StreamPosition,
    parked: Mapping[int, Event],
    incoming: Iterable[Event],
    rules: SequenceRules,
    skipped: Sequence[tuple[int, int]] = (),
    parked_seqs: Collection[int] | None = None,
) -> StreamPlan:
    """Plan one stream's batch. ``parked_seqs`` are the seqs in the holding table (default:
    those of ``parked``), ``parked`` their events, of which only :func:`parked_needed` must
    be there; ``skipped`` the ranges given up on."""
    known = parked if parked_seqs is None else parked_seqs
    # Most streams of a batch have nothing parked: no set of ranges is built for them.
    if not known and not skipped and position.blocked_seq is None:
        plan = _in_order(position, incoming)
        if plan is not None:
            return plan
    held = SeqRanges.of(known)
    work = _Work(position=position, parked=dict(parked), parked_seqs=held, skipped=skipped)
    _release_dead_lettered(work)
    work.drain()  # parked successors of a just-retried or skipped event
    for event in incoming:
        _place(work, event, rules)
    return StreamPlan(  # in field order (stream, position, apply, park, unpark, ...)
        position.stream,
        work.final(),
        tuple(work.apply),
        tuple(sorted(work.new_parked.values(), key=_seq)),
        tuple(work.unpark),
        work.duplicates,
        tuple(work.rejected),
        missing_ranges(work.position, _with(work.parked_seqs, work.new_parked), skipped),
    )


def parked_needed(
    position: StreamPosition,
    parked_seqs: Collection[int],
    incoming_seqs: Iterable[int],
    skipped: Sequence[tuple[int, int]] = (),
) -> set[int]:
    """Which parked events :func:`sequence_stream` can meet in this batch: those whose seq
    arrives again (a duplicate or a conflict, told apart by the payload), and the run that
    may drain after the position through parked and arriving seqs and skipped ranges, up to
    a blocked seq. Never more: a stream blocked by a dead letter, with thousands parked
    behind it, would otherwise load them all in every batch that touches it."""
    held = parked_seqs if isinstance(parked_seqs, SeqRanges) else SeqRanges.of(parked_seqs)
    if not held:
        return set()
    arriving = set(incoming_seqs)
    wanted = {seq for seq in arriving if seq in held}
    seq = position.last_seq + 1
    while seq != position.blocked_seq:
        if seq in held:
            wanted.add(seq)
        elif (skip := _skipped_range(skipped, seq)) is not None:
            seq = skip[1] + 1
            continue
        elif seq not in arriving:
            break
        seq += 1
    return wanted


def _in_order(position: StreamPosition, incoming: Iterable[Event]) -> StreamPlan | None:
    """The common case in short: nothing parked, blocked or skipped, and the batch holds the
    stream's next events in order. ``None`` for anything else."""
    events = tuple(incoming)
    expected = position.last_seq + 1
    for event in events:
        if event.seq != expected:
            return None
        expected += 1
    if not events:
        return None
    last = events[-1]
    stream = position.stream
    # Positional: from keywords, a named tuple costs 1.7 times as much (480 ns, 280), per stream.
    return StreamPlan(stream, StreamPosition(stream, expected - 1, last.id, last.hash), events)


def _release_dead_lettered(work: _Work) -> None:
    # A parked event that has just become the stream's dead letter leaves the holding table:
    # the dead letter now holds it.
    blocked = work.position.blocked_seq
    if blocked is not None and blocked in work.parked_seqs:
        work.parked_seqs.discard(blocked)
        work.unpark.append(blocked)


def _place(work: _Work, event: Event, rules: SequenceRules) -> None:
    seq = _seq(event)
    last = work.position.last_seq
    if seq < rules.first_seq:
        work.rejected.append(
            Rejection(
                event, "seq_below_first", f"seq {seq} is below the first seq {rules.first_seq}"
            )
        )
    elif (skip := work.skipped_range(seq)) is not None:
        reason = f"seq {seq} arrived after its gap {skip[0]}-{skip[1]} was skipped"
        work.rejected.append(Rejection(event, "skipped", reason))
    elif seq <= last or seq == work.position.blocked_seq:
        _duplicate(work, event, seq)
    elif seq == last + 1:
        work.advance(event)
        work.drain()
    elif seq - last <= rules.max_seq_jump:
        _park(work, event, seq)
    else:
        work.rejected.append(
            Rejection(
                event,
                "seq_jump",
                f"seq {seq} jumps {seq - last} past the last applied seq {last}, "
                f"more than max_seq_jump {rules.max_seq_jump}",
            )
        )


def _duplicate(work: _Work, event: Event, seq: int) -> None:
    pos = work.position
    if seq == pos.last_seq and not work.last_hash_matches(event):
        work.rejected.append(
            Rejection(
                event,
                "conflict",
                f"seq {seq} was applied as event {pos.last_id} with another payload",
            )
        )
    else:
        work.duplicates += 1


def _park(work: _Work, event: Event, seq: int) -> None:
    held = work.held(seq)
    if held is None:
        work.new_parked[seq] = event
    elif held.hash == event.hash:  # both hashed now: the same scheme
        work.duplicates += 1
    else:
        work.rejected.append(
            Rejection(
                event, "conflict", f"seq {seq} is parked as event {held.id} with another payload"
            )
        )


def missing_ranges(
    position: StreamPosition,
    parked_seqs: Iterable[int],
    skipped: Sequence[tuple[int, int]] = (),
) -> tuple[tuple[int, int], ...]:
    """The contiguous missing ranges between the last applied seq and the highest parked one.
    A blocked seq is not missing (its dead letter holds it), nor is a skipped range. Walks
    the parked seqs' ranges, so a backlog of consecutive seqs costs one step."""
    blocked = position.blocked_seq
    if isinstance(parked_seqs, SeqRanges) and blocked is None:
        present = parked_seqs  # only read here: no copy
    else:
        present = SeqRanges.of(parked_seqs)
        if blocked is not None:
            present.add(blocked)
    if not present:
        return ()
    ranges: list[tuple[int, int]] = []
    expected = position.last_seq + 1
    for lo, hi in present.ranges():
        if hi < expected:
            continue
        if lo > expected:
            ranges += _minus(expected, lo - 1, skipped)
        expected = hi + 1
    return tuple(ranges)


def _skipped_range(skipped: Sequence[tuple[int, int]], seq: int) -> tuple[int, int] | None:
    """The skipped range ``seq`` falls in, if any."""
    if not skipped:  # the usual stream: no generator to build
        return None
    return next(((lo, hi) for lo, hi in skipped if lo <= seq <= hi), None)


def _with(parked: SeqRanges, new: Iterable[int]) -> SeqRanges:
    both = SeqRanges.of(parked)
    for seq in new:
        both.add(seq)
    return both


def _minus(lo: int, hi: int, skipped: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The range lo..hi without the skipped ranges."""
    pieces = [(lo, hi)]
    for s_lo, s_hi in skipped:
        pieces = [
            part
            for a, b in pieces
            for part in ((a, min(b, s_lo - 1)), (max(a, s_hi + 1), b))
            if part[0] <= part[1]
        ]
    return pieces


def group_by_stream(events: Sequence[Event]) -> dict[str, list[Event]]:
    """Events per stream, each list in arrival order; streams in order of first arrival."""
    out: dict[str, list[Event]] = {}
    for event in events:
        out.setdefault(event.stream, []).append(event)
    return out


def _seq(event: Event) -> int:
    if event.seq is None:
        raise ValueError(f"event {event.id} of stream {event.stream} has no seq (sequence mode)")
    return event.seq
