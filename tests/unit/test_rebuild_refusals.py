"""What ``projector rebuild`` refuses before it touches anything, and how it applies a
correlated projection."""

from __future__ import annotations

import pytest

from projector.config import Config, load_config
from projector.runner.rebuild import Rebuilder
from tests.unit.test_config import EXAMPLE


def _school_on(store: str) -> Config:
    """The example config with its correlated projection in ``store`` (built past validation:
    the config itself may refuse a correlation on Redis)."""
    config = load_config(EXAMPLE, env={})
    school = config.projection("school").model_copy(update={"store": store})
    return config.model_copy(update={"projections": [school]})


def test_a_correlated_projection_on_redis_is_not_rebuilt_yet() -> None:
    """Proves the refusal comes first, with its reason: on Redis the rebuild's held business
    events are not handed over to the outbox at the swap yet. No store is opened (the
    example's servers need not be up)."""
    with pytest.raises(ValueError, match="supported on PostgreSQL only for now"):
        Rebuilder(_school_on("redis"), "school")


def test_a_correlated_projection_on_postgres_is_rebuilt_under_the_live_correlation_name() -> None:
    """Proves a correlated PostgreSQL projection is accepted, and that the rebuild applies it
    under its own state name but with the correlation named as the live one (the prefix of
    business ids and streams), so it names the very events the live run named. Nothing
    connects: the store opens its connection on first use."""
    rebuilder = Rebuilder(_school_on("postgres"), "school")
    try:
        shadow = rebuilder._shadow()
    finally:
        rebuilder.close()
    assert shadow.name == "school#rebuild"
    assert shadow.view_schema == "school__rebuild"
    assert shadow.correlation is not None and shadow.correlation.name == "school"
