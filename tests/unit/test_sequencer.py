"""The sequencer's rules, and the property the product rests on: whatever the arrival order,
batching and duplication, a stream's events are applied once each, in seq order."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from projector.core.event import HASH_PREFIX, Event, legacy_payload_hash, payload_hash
from projector.core.sequencer import (
    SequenceRules,
    StreamPlan,
    StreamPosition,
    missing_ranges,
    parked_needed,
    sequence_stream,
)

RULES = SequenceRules(first_seq=1, max_seq_jump=1000)


def ev(seq: int, stream: str = "s", payload: str = "x") -> Event:
    return Event(stream, seq, None, "T", {"v": payload, "seq": seq}, f"{stream}/{seq}")


@dataclass
class FakeStore:
    """Carries a stream's state from one plan to the next, as the store's transaction does."""

    position: StreamPosition = field(default_factory=lambda: StreamPosition.new("s", RULES))
    parked: dict[int, Event] = field(default_factory=dict)
    applied: list[int] = field(default_factory=list)
    duplicates: int = 0

    def run(self, incoming: list[Event], rules: SequenceRules = RULES) -> StreamPlan:
        plan = sequence_stream(self.position, self.parked, incoming, rules)
        for seq in plan.unpark:
            del self.parked[seq]
        for event in plan.park:
            assert event.seq not in self.parked, "a parked seq is never parked twice"
            self.parked[event.seq] = event  # type: ignore[index]
        self.applied += [e.seq for e in plan.apply]  # type: ignore[misc]
        self.duplicates += plan.duplicates
        self.position = plan.position
        return plan


def test_in_order_events_apply_directly() -> None:
    """Proves the fast path: contiguous events apply without touching the holding table."""
    plan = FakeStore().run([ev(1), ev(2), ev(3)])
    assert [e.seq for e in plan.apply] == [1, 2, 3]
    assert plan.park == () and plan.unpark == () and plan.gaps == ()
    assert plan.position.last_seq == 3 and plan.position.last_id == "s/3"


def test_gap_parks_and_each_missing_range_is_its_own_gap() -> None:
    """Proves DESIGN's example: last 5, parked 8 and 12 → gaps 6-7 and 9-11."""
    store = FakeStore()
    store.run([ev(i) for i in range(1, 6)])
    plan = store.run([ev(12), ev(8)])
    assert plan.apply == ()
    assert [e.seq for e in plan.park] == [8, 12]
    assert plan.gaps == ((6, 7), (9, 11))


def test_filling_a_gap_drains_parked_successors_in_order() -> None:
    """Proves drain: the missing events arrive, the parked ones follow them in the same plan and
    leave the holding table."""
    store = FakeStore()
    store.run([ev(3), ev(5), ev(4)])
    plan = store.run([ev(2), ev(1)])
    assert [e.seq for e in plan.apply] == [1, 2, 3, 4, 5]
    assert sorted(plan.unpark) == [3, 4, 5]
    assert plan.gaps == () and store.parked == {}


def test_duplicates_are_dropped_and_counted() -> None:
    """Proves seq <= last and an already parked seq are duplicates, not re-applied."""
    store = FakeStore()
    store.run([ev(1), ev(2), ev(4)])
    plan = store.run([ev(1), ev(2), ev(4)])
    assert plan.apply == () and plan.park == () and plan.duplicates == 3


def test_same_seq_with_other_payload_is_a_conflict() -> None:
    """Proves a re-used seq with a different payload is a dead letter, for the last applied
    event and for a parked one, and that the stored versions stand."""
    store = FakeStore()
    store.run([ev(1), ev(3)])
    plan = store.run([ev(1, payload="other"), ev(3, payload="other")])
    assert [r.kind for r in plan.rejected] == ["conflict", "conflict"]
    assert plan.duplicates == 0 and store.parked[3].data["v"] == "x"


def test_seq_jump_beyond_bound_and_below_first_are_rejected() -> None:
    """Proves the bounds: a jump larger than max_seq_jump and a seq below first_seq are dead
    letters, and neither changes the position or parks anything."""
    rules = SequenceRules(first_seq=1, max_seq_jump=10)
    store = FakeStore()
    plan = store.run([ev(11), ev(0), ev(10)], rules)
    assert [r.kind for r in plan.rejected] == ["seq_jump", "seq_below_first"]
    assert [e.seq for e in plan.park] == [10]
    assert plan.position.last_seq == 0


def test_first_seq_is_configurable() -> None:
    """Proves a stream may start at 0: seq 0 applies, not parks."""
    rules = SequenceRules(first_seq=0)
    position = StreamPosition.new("s", rules)
    plan = sequence_stream(position, {}, [ev(1), ev(0)], rules)
    assert [e.seq for e in plan.apply] == [0, 1]


def test_blocked_stream_parks_everything_after_its_dead_letter() -> None:
    """Proves a dead-lettered event halts only its stream: later events park, the blocked seq
    is not reported as a gap, and a parked copy of it leaves the holding table."""
    blocked = StreamPosition("s", 2, "s/2", ev(2).hash, blocked_seq=3)
    plan = sequence_stream(blocked, {3: ev(3)}, [ev(5), ev(4), ev(3)], RULES)
    assert plan.apply == ()
    assert [e.seq for e in plan.park] == [4, 5]
    assert plan.unpark == (3,)
    assert plan.duplicates == 1
    assert plan.gaps == ()


def test_unblocked_stream_drains_on_its_own() -> None:
    """Proves a skipped dead letter (position moved past it, block lifted) drains what was
    parked behind it without any new incoming event."""
    skipped = StreamPosition("s", 3, "s/3", "h")
    plan = sequence_stream(skipped, {4: ev(4), 5: ev(5)}, [], RULES)
    assert [e.seq for e in plan.apply] == [4, 5]


def test_missing_ranges() -> None:
    """Proves gap computation on a small case, including the blocked seq being held."""
    assert missing_ranges(StreamPosition("s", 5), [8, 12]) == ((6, 7), (9, 11))
    assert missing_ranges(StreamPosition("s", 5, blocked_seq=6), [9]) == ((7, 8),)
    assert missing_ranges(StreamPosition("s", 5), []) == ()


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    """n events, delivered in any order, with any duplicates, cut into any batches."""
    n = draw(st.integers(min_value=1, max_value=40))
    seqs = list(range(1, n + 1))
    dups = draw(st.lists(st.sampled_from(seqs), max_size=n))
    order = draw(st.permutations(seqs + dups))
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=len(order)), max_size=8)))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    return n, [b for b in batches if b]


@given(deliveries())
def test_any_arrival_order_applies_each_seq_once_in_order(
    case: tuple[int, list[list[int]]],
) -> None:
    """Proves the core promise: for any arrival order, duplication and batching, the handler
    sees seq 1..n exactly once each, in order, and nothing stays parked or missing."""
    n, batches = case
    store = FakeStore()
    for batch in batches:
        store.run([ev(s) for s in batch])
    assert store.applied == list(range(1, n + 1))
    assert store.parked == {}
    assert store.position.last_seq == n
    assert store.duplicates == sum(len(b) for b in batches) - n


@given(deliveries(), st.data())
def test_gaps_are_exactly_the_missing_ranges_at_every_step(
    case: tuple[int, list[list[int]]], data: st.DataObject
) -> None:
    """Proves the gap records after every batch are the seqs neither applied nor parked,
    below the highest parked one."""
    _, batches = case
    store = FakeStore()
    for batch in batches:
        plan = store.run([ev(s) for s in batch])
        top = max(store.parked, default=store.position.last_seq)
        present = set(store.applied) | set(store.parked)
        missing = [s for s in range(1, top + 1) if s not in present]
        covered = [s for a, b in plan.gaps for s in range(a, b + 1)]
        assert covered == missing


@given(deliveries())
def test_replaying_a_batch_changes_nothing(case: tuple[int, list[list[int]]]) -> None:
    """Proves idempotence: a batch delivered again after it was applied (a re-read after a crash
    before the Kafka commit) only counts duplicates."""
    _, batches = case
    store = FakeStore()
    for batch in batches:
        store.run([ev(s) for s in batch])
        again = store.run([ev(s) for s in batch])
        assert again.apply == () and again.park == () and again.rejected == ()


def test_block_further_down_the_stream_still_applies_what_comes_before_it() -> None:
    """Proves a dead letter at seq 4 (found by the handler mid-batch) lets seq 1..3 apply and
    drain, and parks everything after 4."""
    position = StreamPosition("s", 0, blocked_seq=4)
    plan = sequence_stream(position, {2: ev(2), 5: ev(5)}, [ev(3), ev(1), ev(4), ev(6)], RULES)
    assert [e.seq for e in plan.apply] == [1, 2, 3]
    assert [e.seq for e in plan.park] == [6]
    assert plan.position.last_seq == 3 and plan.position.blocked_seq == 4
    assert plan.gaps == ()


def test_skipped_range_is_stepped_over_and_parked_successors_drain() -> None:
    """Proves the skip policy's effect: a gap 3-4 given up on is stepped over, and the parked
    5 and 6 apply without any new event."""
    position = StreamPosition("s", 2, "s/2", ev(2).hash)
    plan = sequence_stream(position, {5: ev(5), 6: ev(6)}, [], RULES, skipped=[(3, 4)])
    assert [e.seq for e in plan.apply] == [5, 6]
    assert plan.gaps == ()
    assert plan.position.last_seq == 6


def test_late_event_for_a_skipped_range_is_rejected_not_dropped() -> None:
    """Proves an event that arrives after its gap was skipped is a dead letter (kind skipped),
    not silently counted as a duplicate, and not applied."""
    position = StreamPosition("s", 6, "s/6", ev(6).hash)
    plan = sequence_stream(position, {}, [ev(4), ev(6)], RULES, skipped=[(3, 4)])
    assert [(r.kind, r.event.seq) for r in plan.rejected] == [("skipped", 4)]
    assert plan.duplicates == 1 and plan.apply == ()


def test_skipped_range_is_not_a_gap() -> None:
    """Proves a skipped range ahead of the position is not reported as missing, while the rest
    of the hole still is."""
    assert missing_ranges(StreamPosition("s", 1), [10], skipped=[(4, 6)]) == ((2, 3), (7, 9))


@given(
    last=st.integers(min_value=0, max_value=20),
    seqs=st.lists(st.integers(min_value=1, max_value=30), max_size=8),
    stored_hash=st.sampled_from([None, "legacy", "current"]),
)
def test_the_in_order_shortcut_plans_as_the_general_rules_do(
    last: int, seqs: list[int], stored_hash: str | None
) -> None:
    """Proves the shortcut for the common case (nothing parked, blocked or skipped) changes
    nothing: its plan equals the general rules' plan for any incoming seqs, duplicates and
    conflicts included. The general rules are reached by giving the stream a skipped range far
    beyond every seq, which changes no decision but rules the shortcut out."""
    last_event = ev(last) if last else None
    hashes = {"legacy": legacy_payload_hash("T", {"v": "x", "seq": last}), "current": None}
    last_hash = None
    if last_event is not None and stored_hash is not None:
        last_hash = hashes[stored_hash] or last_event.hash
    position = StreamPosition("s", last, last_event.id if last_event else None, last_hash)
    incoming = [ev(s, payload="x" if s % 3 else "y") for s in seqs]
    fast = sequence_stream(position, {}, incoming, RULES)
    general = sequence_stream(position, {}, incoming, RULES, skipped=[(10_000, 10_001)])
    assert fast == general


def test_a_position_hashed_by_an_older_version_still_tells_duplicates_from_conflicts() -> None:
    """Proves an upgrade keeps the conflict rule: a position stored with projector 0.1's
    payload hash recognises the same event as a duplicate and a changed one as a conflict."""
    applied = ev(4)
    position = StreamPosition("s", 4, applied.id, legacy_payload_hash(applied.type, applied.data))
    same = sequence_stream(position, {}, [ev(4)], RULES)
    changed = sequence_stream(position, {}, [ev(4, payload="other")], RULES)
    assert same.duplicates == 1 and same.rejected == ()
    assert [r.kind for r in changed.rejected] == ["conflict"]
    assert payload_hash(applied.type, applied.data).startswith(HASH_PREFIX)


def test_the_payload_hash_is_the_one_stored_positions_hold() -> None:
    """Proves the payload hash does not change between versions: positions and parked events
    written by earlier ones hold it, and a different value would turn every later duplicate of
    their events into a conflict. Key order does not count; the value is pinned."""
    data = {"amount": 125, "owner": "Ada", "nested": {"b": [1, 2.5, None], "a": True}}
    reordered = {"nested": {"a": True, "b": [1, 2.5, None]}, "owner": "Ada", "amount": 125}
    assert payload_hash("DEPOSITED", data) == "b2:8966b281d3c0a6a3a8cf08a6bbc0fad6"
    assert payload_hash("DEPOSITED", reordered) == payload_hash("DEPOSITED", data)


@given(
    last=st.integers(min_value=0, max_value=10),
    parked=st.sets(st.integers(min_value=1, max_value=25), max_size=10),
    seqs=st.lists(st.integers(min_value=1, max_value=25), max_size=10),
    blocked=st.sampled_from([None, "next", 12]),
    skipped=st.sampled_from([(), ((12, 13),), ((5, 6), (15, 17))]),
)
def test_a_batch_that_loads_only_the_parked_events_it_can_meet_plans_the_same(
    last: int,
    parked: set[int],
    seqs: list[int],
    blocked: int | str | None,
    skipped: tuple[tuple[int, int], ...],
) -> None:
    """Proves what lets a batch's cost not grow with a backlog of parked events: loading
    only :func:`parked_needed` (the parked seqs that arrive again, and the run that can
    drain, across skipped ranges and up to a blocked seq) gives the same plan as loading
    every parked event, duplicates, conflicts and gaps included; also on a stream blocked by
    a dead letter (its next seq, or a later one) and on one with skipped ranges."""
    blocked_seq = last + 1 if blocked == "next" else blocked
    assert blocked_seq is None or isinstance(blocked_seq, int)
    position = StreamPosition("s", last, blocked_seq=blocked_seq)
    gone = {s for lo, hi in skipped for s in range(lo, hi + 1)} | {blocked_seq}
    stored = {s: ev(s) for s in parked if s > last and s not in gone}
    incoming = [ev(s, payload="x" if s % 4 else "y") for s in seqs]
    needed = parked_needed(position, stored, seqs, skipped)
    subset = {s: e for s, e in stored.items() if s in needed}
    everything = sequence_stream(position, stored, incoming, RULES, skipped)
    assert sequence_stream(position, subset, incoming, RULES, skipped, stored) == everything


def test_a_blocked_stream_loads_only_what_arrives_again() -> None:
    """Proves the case found by bench.backlog with poison events: a stream blocked at its next
    seq (a dead letter) with 5,000 parked behind it needs, of those, only the parked seqs
    that arrive again, even when the dead-lettered seq itself arrives again (the run stops
    at it); it used to load them all, in every batch that touched it."""
    position = StreamPosition("s", 1, blocked_seq=2)
    assert parked_needed(position, range(3, 5003), [2, 4000, 6000]) == {4000}
