"""``handlers.accounts`` behind the test gate (see ``tests/integration/gate.py``)."""

from __future__ import annotations

from collections.abc import Sequence

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event
from tests.integration import gate

MIGRATIONS = accounts.MIGRATIONS


def handle(events: Sequence[Event], view: PgView) -> None:
    gate.pass_through(len(events))
    accounts.handle(events, view)
