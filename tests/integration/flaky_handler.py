"""A handler for tests: the accounts view, raising a transient error (a serialization failure,
as PostgreSQL reports under contention) on its first ``FAILURES["left"]`` calls."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = accounts.MIGRATIONS
FAILURES = {"left": 0}


def handle(events: Sequence[Event], view: PgView) -> None:
    if FAILURES["left"] > 0:
        FAILURES["left"] -= 1
        raise psycopg.errors.SerializationFailure("could not serialize access (test)")
    accounts.handle(events, view)
