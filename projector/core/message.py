"""The raw message as the source hands it over: Kafka's record without Kafka's types, so
decoders and tests need no broker."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from projector.core.event import SourceRef


class RawMessage(NamedTuple):
    """One consumed record. A named tuple: one is made per message, in less than half the
    time of a frozen dataclass."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def source(self) -> SourceRef:
        return SourceRef(self.topic, self.partition, self.offset)


class PartitionSpan(NamedTuple):
    """What a batch read of one partition: its first offset, the checkpoint after it (the
    offset after the last one read, as in Kafka), and its newest message timestamp."""

    first: int
    next: int
    newest_ms: int | None


def partition_spans(messages: Iterable[RawMessage]) -> dict[tuple[str, int], PartitionSpan]:
    """Each partition's span in one pass. A consumer hands a partition's messages over in
    runs, so the partition is looked up once per run, not per message (a batch of 2,000:
    0.3 ms, against 1.5 ms for the three loops this replaced)."""
    spans: dict[tuple[str, int], list[int]] = {}
    topic: str | None = None
    partition = -1
    span: list[int] = []
    # Fields by position (0 topic, 1 partition, 2 offset, 5 timestamp_ms): cheaper than by
    # name, once per message.
    for m in messages:
        if m[1] != partition or m[0] != topic:
            topic, partition = m[0], m[1]
            found = spans.get((topic, partition))
            if found is None:
                found = spans[(topic, partition)] = [m[2], m[2] + 1, -1]
            span = found
        offset = m[2]
        if offset < span[0]:
            span[0] = offset
        elif offset >= span[1]:
            span[1] = offset + 1
        ts = m[5]
        if ts is not None and ts > span[2]:
            span[2] = ts
    return {
        tp: PartitionSpan(first, next_, None if newest < 0 else newest)
        for tp, (first, next_, newest) in spans.items()
    }
