"""Customer list from event-sourced customer events (the seed's event-sourcing question).

Owns the view table ``customers``: one row per existing customer. Stream ``customer:<id>``;
``CUSTOMER_CREATED`` (id, name, email) inserts the row, ``CUSTOMER_RENAMED`` (id, name) renames,
``CUSTOMER_DELETED`` (id) removes the row, and a later ``CUSTOMER_CREATED`` of the same id starts
it afresh. ``version`` is the seq of the last event applied to the row, ``applied_events`` the
number of events applied since it was (re)created: a double apply shows as a count too high.

``handle`` reads the batch's touched rows once, folds the events in Python (``fold_customers``,
pure) and writes each touched row once. An event that does not fit the customer's state (a rename
before the create, a second create) can only come from misordered delivery, so it raises
``ValueError`` naming the rule rather than guessing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from projector.apply import PgView
from projector.core.event import Event

MIGRATIONS = [
    """
    create table customers (
        id text primary key,
        name text not null,
        email text,
        version bigint not null,
        applied_events bigint not null
    )
    """,
]

CREATED = "CUSTOMER_CREATED"
RENAMED = "CUSTOMER_RENAMED"
DELETED = "CUSTOMER_DELETED"
TYPES = frozenset((CREATED, RENAMED, DELETED))

_SELECT = "select id, name, email, version, applied_events from customers where id = any(%s)"
_UPSERT = """
    insert into customers (id, name, email, version, applied_events)
    values (%s, %s, %s, %s, %s)
    on conflict (id) do update set
        name = excluded.name, email = excluded.email,
        version = excluded.version, applied_events = excluded.applied_events
"""
_DELETE = "delete from customers where id = any(%s)"


@dataclass(slots=True)
class Customer:
    """One ``customers`` row."""

    id: str
    name: str
    email: str | None
    version: int
    applied_events: int


def handle(events: Sequence[Event], view: PgView) -> None:
    """Apply a batch: one read of the touched rows, one delete, one upsert executemany."""
    ids = sorted({customer_id(e) for e in events if e.type in TYPES})
    if not ids:
        return
    current = {row[0]: Customer(*row) for row in view.fetchall(_SELECT, (ids,))}
    changed = fold_customers(current, events)
    gone = sorted(cid for cid, c in changed.items() if c is None and cid in current)
    if gone:
        view.execute(_DELETE, (gone,))
    # Sorted by id so that concurrent writers touching the same rows lock them in one order.
    kept = sorted((c for c in changed.values() if c is not None), key=lambda c: c.id)
    if kept:
        view.executemany(_UPSERT, [_params(c) for c in kept])


def fold_customers(
    current: Mapping[str, Customer], events: Sequence[Event]
) -> dict[str, Customer | None]:
    """The state of every customer ``events`` touch, after applying them in order over
    ``current`` (the rows as stored; absent = no row). ``None`` means the row must not exist.
    ``current`` is not modified. Events of other types are not this view's and are skipped."""
    state: dict[str, Customer | None] = {}
    for event in events:
        if event.type not in TYPES:
            continue
        cid = customer_id(event)
        if cid not in state:
            before = current.get(cid)
            state[cid] = None if before is None else replace(before)
        state[cid] = _apply(state[cid], event)
    return state


def customer_id(event: Event) -> str:
    return str(event.data["id"])


def _apply(customer: Customer | None, event: Event) -> Customer | None:
    seq = _seq(event)
    if event.type == CREATED:
        if customer is not None:
            raise _violation(event, "CUSTOMER_CREATED of a customer that exists")
        return Customer(customer_id(event), event.data["name"], event.data.get("email"), seq, 1)
    if customer is None:
        raise _violation(event, f"{event.type} of a customer that does not exist")
    if seq <= customer.version:
        raise _violation(event, f"seq must grow (row is at version {customer.version})")
    if event.type == DELETED:
        return None
    customer.name = event.data["name"]
    customer.version = seq
    customer.applied_events += 1
    return customer


def _seq(event: Event) -> int:
    if event.seq is None:
        raise _violation(event, "customers need sequence mode (event has no seq)")
    return event.seq


def _violation(event: Event, rule: str) -> ValueError:
    return ValueError(f"{event.stream} seq {event.seq} {event.type}: {rule}")


def _params(c: Customer) -> tuple[Any, ...]:
    return (c.id, c.name, c.email, c.version, c.applied_events)
