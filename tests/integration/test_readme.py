"""The handler example in the README works as printed."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator

import pytest

from projector.apply import LoadedHandler
from projector.core.event import Event
from projector.core.sequencer import SequenceRules
from projector.runner.batch import BatchApplier, BatchResult
from projector.store.migrate import ViewMigrations, migrate
from projector.store.postgres import PostgresStore
from tests.conftest import ROOT
from tests.integration.harness import rows

pytestmark = pytest.mark.integration


@pytest.fixture
def readme_handler() -> Iterator[types.ModuleType]:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# handlers/accounts_simple.py\n.*?)```", text, re.S)
    assert code, "the README's handler example is missing"
    module = types.ModuleType("readme_handler")
    exec(compile(code.group(1), "README.md", "exec"), module.__dict__)
    sys.modules["readme_handler"] = module
    yield module
    del sys.modules["readme_handler"]


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
