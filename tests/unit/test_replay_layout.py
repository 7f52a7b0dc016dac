"""The replay topic's layout warning (docs/replay.md, "Several instances"): when replayed
events cannot be counted on to reach their stream's own consumer, and what is said then."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from projector.config import ProjectionConfig
from projector.runner.replay_layout import replay_layout_warning, warn_if_replays_land_elsewhere


def projection(topics: list[str], replay_topic: str | None = "replays") -> ProjectionConfig:
    data: dict[str, Any] = {
        "name": "accounts",
        "topics": topics,
        "handlers": ["handlers.accounts"],
        "decoder": {"kind": "json", "stream": "stream", "seq": "seq"},
        "replay_topic": replay_topic,
    }
    return ProjectionConfig.model_validate(data)


@pytest.mark.parametrize("strategy", ["", "range", "range,roundrobin", "range, cooperative-sticky"])
def test_a_replay_topic_partitioned_like_the_source_under_range_is_not_warned_about(
    strategy: str,
) -> None:
    """Proves no warning when the replay topic has the source topics' number of partitions
    and the assignor tried first is range (librdkafka's default when none is set)."""
    counts = {"orders": 6, "payments": 6, "replays": 6}
    assert replay_layout_warning(projection(["orders", "payments"]), counts, strategy) is None


def test_fewer_replay_partitions_than_the_source_is_warned_about_with_the_fix() -> None:
    """Proves the message names the projection, both counts, what goes wrong with several
    instances on each store, and the fix (the count to give, the assignor, the key)."""
    said = replay_layout_warning(projection(["orders"]), {"orders": 6, "replays": 1}, "")
    assert said is not None
    assert said.startswith("projection accounts: replay topic replays has 1 partition(s)")
    assert "and the source 6, so with several instances" in said
    assert "Redis: batches refused and planned again" in said
    assert "PostgreSQL: row lock waits" in said
    assert "Give replays 6 partitions" in said
    assert "key replays by stream with the source producers' partitioner" in said


@pytest.mark.parametrize("strategy", ["roundrobin", "cooperative-sticky", "roundrobin,range"])
def test_an_assignor_other_than_range_is_warned_about(strategy: str) -> None:
    """Proves a layout that fits is still warned about when the first assignor is not range:
    only range gives a member the same partition numbers of both topics."""
    counts = {"orders": 4, "replays": 4}
    said = replay_layout_warning(projection(["orders"]), counts, strategy)
    assert said is not None
    assert f"the assignor is {strategy.partition(',')[0]}, not range" in said
    assert "partition(s)" not in said


@pytest.mark.parametrize(
    ("topics", "replay", "counts"),
    [
        (["orders"], None, {"orders": 6}),  # no replay topic
        (["orders", "replays"], "replays", {"orders": 6, "replays": 1}),  # replays on a source
        (["orders"], "replays", {"orders": 6}),  # the replay topic's size unknown
        (["orders"], "replays", {"replays": 1}),  # the source's size unknown
        (["orders", "payments"], "replays", {"orders": 6, "payments": 3, "replays": 1}),
    ],
)
def test_nothing_is_said_where_no_layout_fits_or_nothing_is_known(
    topics: list[str], replay: str | None, counts: Mapping[str, int]
) -> None:
    """Proves silence without a replay topic, when replays come back on a source topic, when
    a size could not be read (brokers away: the daemon starts anyway), and when the source
    topics differ in size (no replay topic fits them all)."""
    assert replay_layout_warning(projection(topics, replay), counts, "") is None


def test_the_warning_is_logged_and_asks_only_for_the_consumed_topics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves ``warn_if_replays_land_elsewhere`` asks for the projection's consumed topics,
    logs the warning, and does not ask at all for a projection without a replay topic."""
    asked: list[list[str]] = []

    def counts(topics: Sequence[str]) -> Mapping[str, int]:
        asked.append(list(topics))
        return {"orders": 2, "replays": 1}

    with caplog.at_level("WARNING", logger="projector.runner.replay_layout"):
        said = warn_if_replays_land_elsewhere(projection(["orders"]), counts, "")
        assert warn_if_replays_land_elsewhere(projection(["orders"], None), counts, "") is None
    assert asked == [["orders", "replays"]]
    assert said is not None and [r.getMessage() for r in caplog.records] == [said]
