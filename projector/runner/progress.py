"""How far behind one projection's partitions are: lag in messages (from the broker, refreshed
every few seconds, not per batch) and in seconds of message time, for metrics and ``/readyz``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from projector.core.message import PartitionSpan
from projector.source.kafka import KafkaSource, TopicPartition

REFRESH_SECONDS = 2.0


class PartitionProgress:
    def __init__(self) -> None:
        self.lag: dict[TopicPartition, int] = {}
        self.newest_ts: dict[TopicPartition, float] = {}  # epoch seconds of the newest applied
        self.assignment_seen = False
        self._next_refresh = 0.0

    def applied(self, spans: Mapping[TopicPartition, PartitionSpan]) -> None:
        """A batch committed, having read these spans of its partitions."""
        for tp, span in spans.items():
            if span.newest_ms is not None:
                self.newest_ts[tp] = max(self.newest_ts.get(tp, 0.0), span.newest_ms / 1000)

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self.lag.pop(tp, None)
            self.newest_ts.pop(tp, None)

    def refresh(self, source: KafkaSource, force: bool = False) -> bool:
        """Re-read the lag when due, or when ``force``d; True if it did. Uses the end offsets
        the fetches brought back; when they say "caught up" and it matters (``force``), asks
        the broker to be sure."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return False
        self._next_refresh = now + REFRESH_SECONDS
        lag = source.lag(cached=True)
        if force and all(n == 0 for n in lag.values()):
            lag = source.lag(cached=False)
        self.lag = {tp: n for tp, n in lag.items() if tp in source.assigned}
        return True

    def ages(self) -> dict[TopicPartition, float]:
        now = time.time()  # message timestamps are wall-clock time
        return {tp: max(0.0, now - ts) for tp, ts in self.newest_ts.items()}

    def caught_up(self, max_lag: int) -> tuple[bool, str]:
        if not self.assignment_seen:
            return False, "not yet assigned partitions (joining the consumer group)"
        behind = {tp: n for tp, n in self.lag.items() if n > max_lag}
        if behind:
            worst = max(behind, key=lambda tp: behind[tp])
            return (
                False,
                f"{len(behind)} partition(s) behind, {worst[0]}[{worst[1]}] by {behind[worst]}",
            )
        return True, "caught up" if self.lag else "no partitions assigned"
