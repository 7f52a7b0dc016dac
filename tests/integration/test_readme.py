"""The handler example in the README works as printed."""

from __future__ import annotations

import re
import sys
import time
import types
from collections.abc import Iterator

import pytest

from projector.apply import LoadedHandler
from projector.core.event import Event
from projector.core.sequencer import SequenceRules
from projector.runner.batch import BatchApplier, BatchResult
from projector.store.migrate import ViewMigrations, migrate
from projector.store.postgres import PostgresStore
from projector.store.redis import RedisStore
from tests.conftest import ROOT, Services
from tests.integration.harness import rows

pytestmark = pytest.mark.integration


def readme_module(name: str) -> Iterator[types.ModuleType]:
    """The README's code block that starts with ``# handlers/<name>.py``, as a module."""
    text = (ROOT / "README.md").read_text()
    code = re.search(rf"```python\n(# handlers/{name}.py\n.*?)```", text, re.S)
    assert code, f"the README's {name} example is missing"
    module = types.ModuleType(f"readme_{name}")
    exec(compile(code.group(1), "README.md", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


@pytest.fixture
def readme_handler() -> Iterator[types.ModuleType]:
    yield from readme_module("accounts_simple")


@pytest.fixture
def readme_redis_handler() -> Iterator[types.ModuleType]:
    yield from readme_module("scores_redis")


def test_readme_handler_example_applies_a_batch(
    readme_handler: types.ModuleType, pg_dsn: str
) -> None:
    """Proves the README's example handler runs: its migration applies and a batch of deposits
    sums per stream through the real batch applier."""
    migrate(
        pg_dsn,
        "projector",
        [ViewMigrations("simple", "simple", "readme_handler", readme_handler.MIGRATIONS)],
    )
    store = PostgresStore(pg_dsn)
    handler = LoadedHandler(
        "readme_handler", readme_handler.handle, tuple(readme_handler.MIGRATIONS)
    )
    applier = BatchApplier("simple", "simple", store, [handler], SequenceRules(), 30.0, lambda: 0.0)
    events = [
        Event(f"acct:{i % 2}", i // 2 + 1, None, "DEPOSITED", {"amount": 10}, f"e{i}")
        for i in range(6)
    ]
    with store.batch("simple", "simple") as tx:
        applier.apply_events(tx, events, BatchResult())
    store.close()
    assert rows(pg_dsn, "select id, balance from simple.balances order by id") == [
        ("acct:0", 30),
        ("acct:1", 30),
    ]


def test_readme_redis_handler_example_applies_a_batch(
    readme_redis_handler: types.ModuleType, services: Services, redis_prefix: str
) -> None:
    """Proves the README's Redis handler runs through the real Redis store: a batch of points
    lands in the leaderboard and the player hashes, under the projection's view namespace."""
    store = RedisStore(services.redis_url, redis_prefix)
    handler = LoadedHandler("readme_scores_redis", readme_redis_handler.handle, ())
    applier = BatchApplier("scores", "scores", store, [handler], SequenceRules(), 30.0, time.time)
    events = [
        Event(f"play:{i}", 1, None, "POINT", {"game": 7, "player": i % 2, "value": 2}, f"e{i}")
        for i in range(5)
    ]
    with store.batch("scores", "scores") as tx:
        applier.apply_events(tx, events, BatchResult())
    ns = f"{redis_prefix}:v:scores:1"
    board = store.client.zrange(f"{ns}:game:7:leaderboard", 0, -1, withscores=True)
    assert board == [("1", 4.0), ("0", 6.0)]
    assert store.client.hget(f"{ns}:player:0", "points") == "6"
    store.close()
