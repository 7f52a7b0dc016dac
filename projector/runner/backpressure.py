"""Back-pressure at ``max_parked``: while a projection holds that many parked events, its source
partitions are paused so the holding table cannot grow without end. The replay topic is never
paused (it is how gaps fill); when replays come back on the source topics, pausing would block
the very fill it waits for, so then the bound only alerts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from projector.config import ProjectionConfig
from projector.runner.batch import BatchResult
from projector.source.kafka import KafkaSource, TopicPartition
from projector.store.base import Store

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # re-read the projection-wide count (other instances park too)
RESUME_AT = 0.9  # resume below 90% of the bound, so it does not flap at the edge


class BackPressure:
    def __init__(self, projection: ProjectionConfig, store: Store, clock: Callable[[], float]):
        self.name = projection.name
        self.limit = projection.max_parked
        self.source_topics = set(projection.topics)
        self.can_pause = (
            bool(projection.replay_topic) and projection.replay_topic not in projection.topics
        )
        self.store = store
        self.clock = clock
        self.parked: int | None = None
        self.next_refresh = 0.0
        self.active = False
        self.paused: set[TopicPartition] = set()

    def observe(self, result: BatchResult) -> None:
        if self.parked is not None:
            self.parked += result.parked - result.unparked

    def forget_pauses(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions assigned (the source resumes them) or revoked are no longer paused by
        us; under the cooperative protocol the others keep their pause."""
        self.paused -= set(partitions)

    def update(self, source: KafkaSource) -> None:
        now = self.clock()
        if self.parked is None or now >= self.next_refresh:
            self.parked = self.store.count_parked(self.name)
            self.next_refresh = now + REFRESH_SECONDS
        if not self.active and self.parked >= self.limit:
            self.active = True
            log.warning(
                "projection %s: %d parked events reached max_parked %d; %s",
                self.name,
                self.parked,
                self.limit,
                "pausing the source partitions until gaps fill"
                if self.can_pause
                else "not pausing, since replays come back on the source topics",
            )
        elif self.active and self.parked < self.limit * RESUME_AT:
            self.active = False
            log.info(
                "projection %s: %d parked events, resuming the source partitions",
                self.name,
                self.parked,
            )
        wanted = (
            {tp for tp in source.assigned if tp[0] in self.source_topics}
            if self.active and self.can_pause
            else set()
        )
        source.pause(wanted - self.paused)
        source.resume((self.paused - wanted) & source.assigned)
        self.paused = wanted
