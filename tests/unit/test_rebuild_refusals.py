"""How ``projector rebuild`` applies a correlated projection, on either store: nothing is
refused for a correlation any more (Redis included)."""

from __future__ import annotations

import pytest
import yaml

from projector.config import Config, load_config, parse_config
from projector.runner.rebuild import Rebuilder
from tests.unit.test_config import EXAMPLE, example_with_redis


def _school_on(store: str) -> Config:
    """The example config with its correlated projection (and its outbox) in ``store``; on
    Redis with the example's Redis section and the Redis flavour of the handlers."""
    if store == "postgres":
        config = load_config(EXAMPLE, env={})
        school = config.projection("school").model_copy(update={"store": store})
        return config.model_copy(update={"projections": [school]})
    config = parse_config(yaml.safe_load(example_with_redis()), env={})
    school = config.projection("school").model_copy(
        update={
            "store": store,
            "handlers": ["handlers.profiles_redis", "handlers.school_history_redis"],
        }
    )
    return config.model_copy(update={"projections": [school]})


@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_a_correlated_projection_is_rebuilt_under_the_live_correlation_name(store: str) -> None:
    """Proves a correlated projection is accepted on PostgreSQL and on Redis (Redis was
    refused until its swap carried the rebuild's event-time progress over and its start,
    restart and abandon cleared it), and that the rebuild applies it under its own state
    name but with the correlation named as the live one (the prefix of business ids and
    streams), so it names the very events the live run named. Its views go to the shadow
    schema on PostgreSQL, and on Redis to the live namespace (at the version being built).
    Nothing connects: the stores open their connections on first use."""
    rebuilder = Rebuilder(_school_on(store), "school")
    try:
        shadow = rebuilder._shadow()
    finally:
        rebuilder.close()
    assert shadow.name == "school#rebuild"
    assert shadow.view_schema == ("school__rebuild" if store == "postgres" else "school")
    assert shadow.correlation is not None and shadow.correlation.name == "school"
