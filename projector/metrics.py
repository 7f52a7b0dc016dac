"""Prometheus metrics, prefix ``projector_``. Labels are bounded: projection, topic, partition,
kind, outcome; never a stream id.

Counters and histograms are recorded by the runner after each batch commits. Projection-wide
figures (parked events, open gaps, the oldest gap's age, open dead letters) are read from the
store at scrape time by :class:`StoreCollector`, so every instance reports the same truth and
nothing is kept by hand.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from projector import __version__

if TYPE_CHECKING:
    from projector.runner.batch import BatchResult
    from projector.runner.correlate_step import CorrelationOutcome
    from projector.store.base import ProjectionFigures

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


class Metrics:
    """The daemon's metrics in one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, ["projection"]
        self.events = Counter(
            "projector_events", "Events by what happened to them.", [*p, "outcome"], registry=r
        )
        self.dead_letters = Counter(
            "projector_dead_letters", "Dead letters recorded.", [*p, "kind"], registry=r
        )
        self.gaps = Counter("projector_gaps", "Gap ranges by event.", [*p, "event"], registry=r)
        self.replay_requests = Counter(
            "projector_replay_requests", "Replay requests by outcome.", [*p, "outcome"], registry=r
        )
        self.batch_size = Histogram(
            "projector_batch_size_messages",
            "Messages per applied batch.",
            p,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.apply_seconds = Histogram(
            "projector_batch_apply_seconds",
            "Time to apply one batch, its transaction included.",
            p,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.lag_messages = Gauge(
            "projector_consumer_lag_messages",
            "Messages not yet applied per partition (end offset minus position); 0 caught up.",
            [*p, "topic", "partition"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "projector_consumer_lag_seconds",
            "Age of the newest applied message's timestamp while behind; 0 when caught up.",
            [*p, "topic", "partition"],
            registry=r,
        )
        self.gap_timeout = Gauge(
            "projector_gap_timeout_seconds", "The configured gap_timeout.", p, registry=r
        )
        self.backpressure = Gauge(
            "projector_backpressure",
            "1 while max_parked holds the projection's source partitions paused (or would).",
            p,
            registry=r,
        )
        self.last_loop = Gauge(
            "projector_loop_last_run_timestamp_seconds",
            "When the projection's poll loop last went round (staleness means a stalled loop).",
            p,
            registry=r,
        )
        self.correlations_closed = Counter(
            "projector_correlations_closed",
            "Correlation windows closed, by reason (complete, expired).",
            [*p, "reason"],
            registry=r,
        )
        self.correlation_late = Counter(
            "projector_correlation_late_parts",
            "Parts that arrived after their window closed (logged; they name nothing).",
            p,
            registry=r,
        )
        self.correlation_duplicates = Counter(
            "projector_correlation_duplicate_parts",
            "Parts the correlation had already (re-deliveries).",
            p,
            registry=r,
        )
        self.correlation_skipped = Counter(
            "projector_correlation_skipped",
            "Events of the correlation's topics it does not take, by reason.",
            [*p, "reason"],
            registry=r,
        )
        self.correlation_missing = Counter(
            "projector_correlation_missing_parts",
            "Parts a transaction's END record counted that never came before its window closed.",
            p,
            registry=r,
        )
        self.business_events = Counter(
            "projector_business_events",
            "Business events named by a correlation and applied by the handlers.",
            p,
            registry=r,
        )
        # Open correlations and the watermark's lag, read from the store at scrape time.
        self.correlation_figures = CorrelationCollector()
        r.register(self.correlation_figures)
        self.outbox_published = Counter(
            "projector_outbox_published",
            "Business events the outbox publisher delivered to Kafka (again after a crash).",
            p,
            registry=r,
        )
        self.outbox_errors = Counter(
            "projector_outbox_publish_errors",
            "Outbox publishing failures, by outcome (delivery: Kafka refused a message;"
            " timeout: not delivered in time; store: the outbox could not be read or marked).",
            [*p, "outcome"],
            registry=r,
        )
        # The outbox's pending rows and the oldest one's age, read from the store at scrape time.
        self.outbox_figures = OutboxCollector()
        r.register(self.outbox_figures)
        info = Gauge("projector_build_info", "projector's version.", ["version"], registry=r)
        info.labels(__version__).set(1)

    def record_batch(self, projection: str, result: BatchResult, seconds: float) -> None:
        for outcome, value in (
            ("consumed", result.consumed),
            ("applied", result.applied),
            ("duplicate", result.duplicates),
            ("parked", result.parked),
            ("ignored", result.ignored),
        ):
            if value:
                self.events.labels(projection, outcome).inc(value)
        for letter in result.dead_letters:
            self.dead_letters.labels(projection, letter.kind).inc()
        self.record_gaps(projection, result)
        self.batch_size.labels(projection).observe(result.consumed)
        self.apply_seconds.labels(projection).observe(seconds)

    def record_correlation(self, projection: str, outcome: CorrelationOutcome) -> None:
        """After the commit of a batch (or idle tick) that ran a correlation step."""
        for reason, count in outcome.closed.items():
            self.correlations_closed.labels(projection, reason).inc(count)
        for reason, count in outcome.skipped.items():
            self.correlation_skipped.labels(projection, reason).inc(count)
        for counter, value in (
            (self.correlation_late, outcome.late),
            (self.correlation_duplicates, outcome.duplicates),
            (self.correlation_missing, outcome.missing),
            (self.business_events, outcome.business),
        ):
            if value:
                counter.labels(projection).inc(value)

    def record_gaps(self, projection: str, result: BatchResult) -> None:
        for event, value in (
            ("detected", result.gaps_opened),
            ("filled", result.gaps_closed),
            ("skipped", result.gaps_skipped),
        ):
            if value:
                self.gaps.labels(projection, event).inc(value)

    def set_lag(
        self,
        projection: str,
        lag: Mapping[TopicPartition, int],
        ages: Mapping[TopicPartition, float],
    ) -> None:
        for (topic, part), behind in lag.items():
            self.lag_messages.labels(projection, topic, str(part)).set(behind)
            age = ages.get((topic, part), 0.0) if behind > 0 else 0.0
            self.lag_seconds.labels(projection, topic, str(part)).set(age)

    def forget_partitions(self, projection: str, partitions: Sequence[TopicPartition]) -> None:
        """A revoked partition is reported by its new owner, not as stale figures here."""
        for topic, part in partitions:
            for gauge in (self.lag_messages, self.lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(projection, topic, str(part))


class StoreCollector(Collector):
    """Projection-wide figures read from the store at scrape time."""

    def __init__(
        self,
        projections: Sequence[str],
        figures: Callable[[Sequence[str], float], list[ProjectionFigures]],
        reconnect: Callable[[], None],
        clock: Callable[[], float],
    ):
        self._reconnect = reconnect
        self._projections = list(projections)
        self._figures = figures
        self._clock = clock
        self.lock = threading.Lock()  # scrapes may overlap; one connection serves them

    def collect(self) -> Iterator[Metric]:
        families = {
            "parked": GaugeMetricFamily(
                "projector_parked_events",
                "Events waiting in the holding table.",
                labels=["projection"],
            ),
            "open_gaps": GaugeMetricFamily(
                "projector_open_gaps",
                "Missing ranges still open (held ones included).",
                labels=["projection"],
            ),
            "oldest": GaugeMetricFamily(
                "projector_oldest_gap_age_seconds",
                "Age of the oldest open gap; 0 with none.",
                labels=["projection"],
            ),
            "dead": GaugeMetricFamily(
                "projector_dead_letters_open",
                "Dead letters not yet retried or skipped.",
                labels=["projection"],
            ),
        }
        try:
            with self.lock:
                rows = self._figures(self._projections, self._clock())
        except Exception as exc:  # a scrape must not fail because the store is briefly away
            log.warning("metrics: cannot read projection figures from the store: %s", exc)
            self._reconnect()
            return
        for row in rows:
            families["parked"].add_metric([row.projection], row.parked)
            families["open_gaps"].add_metric([row.projection], row.open_gaps)
            families["oldest"].add_metric([row.projection], row.oldest_gap_age)
            families["dead"].add_metric([row.projection], row.dead_letters)
        yield from families.values()


# A correlated projection's figures from its store: (open correlations, the lowest event-time
# high of its input partitions in epoch ms, None while one has none).
CorrelationFigures = Callable[[], tuple[int, int | None]]


class CorrelationCollector(Collector):
    """``projector_correlations_open`` and ``projector_correlation_watermark_lag_seconds``
    (now minus the watermark: the lowest stored event-time high of the correlation's input
    partitions, less ``lateness``), per correlated projection, read from the store at scrape
    time. Each worker with a correlation adds its source (a store connection of its own, used
    only here) and removes it when it stops."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[CorrelationFigures, Callable[[], None], float]] = {}
        self.lock = threading.Lock()  # scrapes may overlap; one connection per source
        self.clock: Callable[[], float] = time.time

    def add(
        self,
        projection: str,
        figures: CorrelationFigures,
        reconnect: Callable[[], None],
        lateness: float = 0.0,
    ) -> None:
        with self.lock:
            self._sources[projection] = (figures, reconnect, lateness)

    def remove(self, projection: str) -> None:
        with self.lock:
            self._sources.pop(projection, None)

    def collect(self) -> Iterator[Metric]:
        opened = GaugeMetricFamily(
            "projector_correlations_open",
            "Correlation keys with parts waiting for their window to close.",
            labels=["projection"],
        )
        lag = GaugeMetricFamily(
            "projector_correlation_watermark_lag_seconds",
            "Now minus the correlation's event-time watermark (absent while it is unset).",
            labels=["projection"],
        )
        with self.lock:
            for projection, (figures, reconnect, lateness) in sorted(self._sources.items()):
                try:
                    count, high = figures()
                except Exception as exc:  # a scrape must not fail because the store is away
                    log.warning("metrics: cannot read %s's correlations: %s", projection, exc)
                    reconnect()
                    continue
                opened.add_metric([projection], count)
                if high is not None:
                    lag.add_metric([projection], max(0.0, self.clock() - high / 1000 + lateness))
        yield opened
        yield lag


# A projection's outbox figures from its store: (rows pending, the oldest one's age in seconds,
# None with none).
OutboxFigures = Callable[[], tuple[int, float | None]]


class OutboxCollector(Collector):
    """``projector_outbox_pending`` and ``projector_outbox_oldest_pending_seconds`` per
    projection with an outbox, read from the store at scrape time. Each instance's publisher
    adds its source (a store connection of its own, used only here), whether or not it holds
    the publishing lock, and removes it when it stops."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[OutboxFigures, Callable[[], None]]] = {}
        self.lock = threading.Lock()  # scrapes may overlap; one connection per source

    def add(self, projection: str, figures: OutboxFigures, reconnect: Callable[[], None]) -> None:
        with self.lock:
            self._sources[projection] = (figures, reconnect)

    def remove(self, projection: str) -> None:
        with self.lock:
            self._sources.pop(projection, None)

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "projector_outbox_pending",
            "Business events queued in the outbox and not yet published.",
            labels=["projection"],
        )
        oldest = GaugeMetricFamily(
            "projector_outbox_oldest_pending_seconds",
            "Age of the oldest business event waiting to be published; 0 with none.",
            labels=["projection"],
        )
        with self.lock:
            for projection, (figures, reconnect) in sorted(self._sources.items()):
                try:
                    count, age = figures()
                except Exception as exc:  # a scrape must not fail because the store is away
                    log.warning("metrics: cannot read %s's outbox: %s", projection, exc)
                    reconnect()
                    continue
                pending.add_metric([projection], count)
                oldest.add_metric([projection], age or 0.0)
        yield pending
        yield oldest
