"""What a batch read of each partition (``partition_spans``): where its checkpoints and the
lag in seconds come from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projector.core.message import PartitionSpan, RawMessage, partition_spans

_messages = st.lists(
    st.builds(
        RawMessage,
        topic=st.sampled_from(["a", "b"]),
        partition=st.integers(min_value=0, max_value=2),
        offset=st.integers(min_value=0, max_value=50),
        key=st.none(),
        value=st.none(),
        timestamp_ms=st.none() | st.integers(min_value=0, max_value=10**13),
    ),
    max_size=40,
)


@given(_messages)
def test_spans_are_each_partitions_lowest_offset_next_offset_and_newest_timestamp(
    messages: list[RawMessage],
) -> None:
    """Proves, for messages of several topics and partitions in any order and interleaving
    (a consumer hands them over in runs per partition; a test or a replay may not), that a
    partition's span is its lowest offset, one past its highest, and its newest timestamp
    (None if none has one): the per-run shortcut never misses a message."""
    expected: dict[tuple[str, int], PartitionSpan] = {}
    for tp in {(m.topic, m.partition) for m in messages}:
        mine = [m for m in messages if (m.topic, m.partition) == tp]
        stamps = [m.timestamp_ms for m in mine if m.timestamp_ms is not None]
        expected[tp] = PartitionSpan(
            min(m.offset for m in mine),
            max(m.offset for m in mine) + 1,
            max(stamps) if stamps else None,
        )
    assert partition_spans(messages) == expected


def test_a_consumers_runs_give_one_span_per_partition() -> None:
    """Proves the usual batch, runs of consecutive offsets per partition with a partition
    seen again after another, gives each partition's first offset and checkpoint."""
    messages = [
        RawMessage("t", 0, 10, None, None, 5),
        RawMessage("t", 0, 11, None, None, 7),
        RawMessage("t", 1, 3, None, None, None),
        RawMessage("t", 0, 12, None, None, 6),
        RawMessage("r", 0, 0, None, None, 1),
    ]
    assert partition_spans(messages) == {
        ("t", 0): PartitionSpan(10, 13, 7),
        ("t", 1): PartitionSpan(3, 4, None),
        ("r", 0): PartitionSpan(0, 1, 1),
    }
