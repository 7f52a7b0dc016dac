"""The customer list of :mod:`handlers.customers`, kept in Redis (store: redis).

Same events, same rules, same fold (``fold_customers``); only the layout differs. Keys, as the
handler names them (a reader prefixes each with ``<redis.prefix>:v:<view_schema>:<version>:``,
the version being in ``<redis.prefix>:v:<view_schema>:active``, e.g.
``projector:v:customers:1:customer:42``):

- ``customer:<id>`` hash: ``name``, ``email`` (absent when the customer gave none),
  ``version`` (seq of the last event applied), ``applied_events`` (events applied since the
  customer was (re)created). No hash = no such customer.
- ``customers`` set: the ids of the existing customers (``SCARD`` counts them).
- ``customers:by_name`` sorted set, every score 0, member ``<name>\\x00<id>``: the list in name
  order (byte order), ``ZRANGE customers:by_name 0 49`` for a page, ``ZRANGE ... BYLEX
  [Ada "[Ada\\xff"`` for a name prefix; the id follows the last NUL. The NUL sorts below any
  character, so "Ada" comes before "Ada Okafor".

``handle`` reads the touched customers in one ``hgetall_many``, folds the batch and writes each
touched customer once. Reads see what is stored, not this batch's writes, which is what the
fold wants: the stored state is its starting point, and the stored name is what tells which
``customers:by_name`` member to remove on a rename or delete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from handlers.customers import TYPES, Customer, customer_id, fold_customers
from projector.core.event import Event
from projector.store.redis_view import RedisView, Value

ALL = "customers"
BY_NAME = "customers:by_name"


def key(cid: str) -> str:
    """The hash of customer ``cid``."""
    return f"customer:{cid}"


def by_name_member(customer: Customer) -> str:
    """The ``customers:by_name`` member of ``customer``."""
    return f"{customer.name}\x00{customer.id}"


def handle(events: Sequence[Event], view: RedisView) -> None:
    """Apply a batch: one read of the touched customers, then each one's writes."""
    ids = sorted({customer_id(e) for e in events if e.type in TYPES})
    if not ids:
        return
    stored = dict(zip(ids, view.hgetall_many(key(cid) for cid in ids), strict=True))
    current = {cid: from_hash(cid, h) for cid, h in stored.items() if h}
    changed = fold_customers(current, events)
    for cid in sorted(changed):
        _write(view, cid, stored[cid], current.get(cid), changed[cid])


def from_hash(cid: str, fields: Mapping[str, str]) -> Customer:
    """A customer as its ``customer:<id>`` hash stores it."""
    return Customer(
        cid,
        fields["name"],
        fields.get("email"),
        int(fields["version"]),
        int(fields["applied_events"]),
    )


def to_hash(customer: Customer) -> dict[str, Value]:
    """The ``customer:<id>`` hash of ``customer`` (no ``email`` field for no email)."""
    fields: dict[str, Value] = {"name": customer.name}
    if customer.email is not None:
        fields["email"] = customer.email
    fields["version"] = customer.version
    fields["applied_events"] = customer.applied_events
    return fields


def _write(
    view: RedisView,
    cid: str,
    stored: Mapping[str, str],
    before: Customer | None,
    after: Customer | None,
) -> None:
    old = None if before is None else by_name_member(before)
    new = None if after is None else by_name_member(after)
    if old is not None and old != new:
        view.zrem(BY_NAME, old)
    if after is None:
        if before is not None:
            view.delete(key(cid))
            view.srem(ALL, cid)
        return
    fields = to_hash(after)
    # A re-created customer may lack a field the old one had (its email): hset alone keeps it.
    view.hdel(key(cid), *sorted(stored.keys() - fields.keys()))
    view.hset(key(cid), fields)
    if before is None:
        view.sadd(ALL, cid)
    if new != old:
        view.zadd(BY_NAME, {by_name_member(after): 0})
