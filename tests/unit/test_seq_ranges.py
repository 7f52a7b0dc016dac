"""SeqRanges (pure): a set of seqs kept as ranges behaves as a set of ints does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projector.core.seq_ranges import SeqRanges

seqs = st.integers(min_value=0, max_value=40)
ops = st.lists(
    st.tuples(st.sampled_from(["add", "discard", "discard_range"]), seqs, seqs), max_size=40
)


@given(start=st.sets(seqs), ops=ops, probes=st.lists(seqs, max_size=10))
def test_it_behaves_as_a_set_under_any_adds_and_removals(
    start: set[int], ops: list[tuple[str, int, int]], probes: list[int]
) -> None:
    """Proves, against a plain set given the same operations from the same start: the same
    members, length, truthiness, highest seq, ascending iteration, and ranges that are
    sorted, disjoint and never adjacent (so equal sets have equal ranges)."""
    ranges, plain = SeqRanges.of(start), set(start)
    for op, a, b in ops:
        if op == "add":
            ranges.add(a)
            plain.add(a)
        elif op == "discard":
            ranges.discard(a)
            plain.discard(a)
        else:
            ranges.discard_range(a, b)
            plain -= set(range(a, b + 1))
    assert list(ranges) == sorted(plain)
    assert len(ranges) == len(plain) and bool(ranges) == bool(plain)
    assert ranges.max() == (max(plain) if plain else None)
    assert all((p in ranges) == (p in plain) for p in probes)
    pairs = ranges.ranges()
    assert all(lo <= hi for lo, hi in pairs)
    assert all(pairs[i][1] + 1 < pairs[i + 1][0] for i in range(len(pairs) - 1))
    assert ranges == SeqRanges.of(plain) == SeqRanges.of(ranges)


def test_a_run_of_seqs_is_one_range_and_a_span_leaves_out_its_gaps() -> None:
    """Proves the point of it: 5,000 consecutive parked seqs are one range, and the parked
    seqs of a stream can be told from its gaps: 3..5002 without 10..12 and 40..40."""
    assert SeqRanges.of(range(3, 5003)).ranges() == [(3, 5002)]
    span = SeqRanges.span(3, 5002, [(10, 12), (40, 40), (9000, 9001)])
    assert span.ranges() == [(3, 9), (13, 39), (41, 5002)]
    assert 11 not in span and 13 in span and "13" not in span
    copy = SeqRanges.of(span)
    copy.discard(13)
    assert 13 in span and 13 not in copy
