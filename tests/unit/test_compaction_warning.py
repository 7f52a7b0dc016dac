"""The warning about compacted correlation topics (docs/correlation.md, section 8): which
policies count, what ``run`` and ``rebuild`` say, and that uncorrelated projections are not
asked about."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from projector.config import load_config
from projector.runner.compaction import compacted, compaction_warning, warn_if_compacted
from tests.unit.test_config import EXAMPLE


@pytest.mark.parametrize(
    ("policy", "is_compacted"),
    [
        ("compact", True),
        ("compact,delete", True),
        ("delete, compact", True),
        ("COMPACT", True),
        ("delete", False),
    ],
)
def test_every_policy_with_compact_counts(policy: str, is_compacted: bool) -> None:
    """Proves ``compact`` is found in Kafka's list forms (alone, with ``delete``, spaced, any
    case), and ``delete`` alone is not compaction."""
    assert compacted({"t": policy}) == (["t"] if is_compacted else [])


def test_delete_only_topics_give_no_warning() -> None:
    """Proves there is no warning when no correlation topic is compacted (or none is known)."""
    assert compaction_warning("school", {"a": "delete", "b": "delete"}, rebuild=True) is None
    assert compaction_warning("school", {}, rebuild=False) is None


def test_the_warning_names_the_compacted_topics_and_what_differs() -> None:
    """Proves the message: the projection, the compacted topics only (sorted), that business
    events can differ, and what to do; ``rebuild`` speaks of this rebuild, ``run`` of a future
    one."""
    policies = {"s.course": "compact,delete", "s.student": "compact", "s.tx": "delete"}
    said = compaction_warning("school", policies, rebuild=True)
    assert said is not None
    assert said.startswith("projection school: correlation topic(s) s.course, s.student have")
    assert "s.tx" not in said
    assert "this rebuild may name other business events than the live run did" in said
    assert "--history-from" in said
    at_run = compaction_warning("school", policies, rebuild=False)
    assert at_run is not None and "a rebuild of it may name other business events" in at_run


def test_only_a_correlated_projection_is_asked_about_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves ``warn_if_compacted`` asks Kafka about the correlation's topics only, never for a
    projection without a correlation, and logs the warning it returns."""
    config = load_config(EXAMPLE, env={})
    asked: list[list[str]] = []

    def policies(topics: Sequence[str]) -> Mapping[str, str]:
        asked.append(list(topics))
        return {t: "compact" for t in topics if t.endswith("student")}

    assert warn_if_compacted(config.projection("customers"), policies) is None
    assert asked == []
    with caplog.at_level("WARNING"):
        said = warn_if_compacted(config.projection("school"), policies, rebuild=True)
    assert asked == [config.projection("school").correlation_topics]
    assert said is not None and "school.public.student have cleanup.policy compact" in said
    assert [r.getMessage() for r in caplog.records] == [said]
