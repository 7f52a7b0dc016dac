"""A handler for tests: the accounts view, and each deposit's ``tag`` recorded in a table whose
foreign key PostgreSQL checks only at the COMMIT (deferrable initially deferred). A deposit
tagged with an unknown tag is refused by the database at the commit, not when its row is
written: the latest an error of a handler's write can surface."""

from __future__ import annotations

from collections.abc import Sequence

from handlers import accounts
from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = [
    *accounts.MIGRATIONS,
    "create table tags (name text primary key)",
    "insert into tags values ('ok')",
    """
    create table deposit_tags (
        id text primary key,
        tag text not null references tags (name) deferrable initially deferred
    )
    """,
]


def handle(events: Sequence[Event], view: PgView) -> None:
    accounts.handle(events, view)
    tagged = [(e.id, e.data["tag"]) for e in events if "tag" in e.data]
    if tagged:
        view.executemany("insert into deposit_tags (id, tag) values (%s, %s)", tagged)
