"""The handler API: what user code implements and what it is handed.

A handler module (named in the config, e.g. ``handlers.customers``) defines::

    MIGRATIONS = ["create table customers (id text primary key, name text)"]

    def handle(events: Sequence[Event], view: PgView) -> None:
        view.executemany("insert into customers ...", [...])

``handle`` gets a batch's events in apply order (per stream in sequence order) and the batch's
store transaction. It never commits, and its SQL never names a schema: the store sets the
``search_path`` to the projection's view schema (live or rebuild shadow). Writes are pipelined,
so a batch costs a few round trips, not one per event. ``MIGRATIONS`` are applied in order by
``projector migrate``, each once, in the view schema.

A projection with ``store: redis`` gets a :class:`projector.store.redis_view.RedisView`
instead: the handler describes its writes (hashes, sets, sorted sets, strings, JSON, counters)
and never holds a client, so the batch's writes and projector's own state land in one script,
all or nothing. Its reads see what is stored, not the batch's own writes. No ``MIGRATIONS``::

    def handle(events: Sequence[Event], view: RedisView) -> None:
        for e in events:
            view.hincrby(f"account:{e.data['id']}", "balance", e.data["amount"])

A merge projection with a ``correlation`` (docs/correlation.md) also hands the business
events its rule names to each handler module's optional ``handle_business``, after
``handle_documents``, in the same transaction::

    def handle_business(events: Sequence[Event], view: PgView) -> None:
        view.executemany("insert into history ... on conflict (business_id) do nothing", [...])

(on Redis the view is the projection's :class:`RedisView`, as for ``handle_documents``: see
``handlers/school_history_redis.py``)

A business event is an :class:`Event` with a stable id derived from its correlation (the same
in a replay or a rebuild: insert keyed on it, ``on conflict do nothing``), ``ts`` the latest
part's time (epoch ms), ``stream`` the rule's or ``<correlation>:<key>``, and ``meta`` saying
which parts made it (``correlation``, ``key``, ``parts``, ``closed``: complete | expired). A
handler failing on one business event turns that event into a dead letter; the others go on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from projector.core.event import Event

Params = Sequence[Any] | Mapping[str, Any] | None


class PgView(Protocol):
    """A projection's PostgreSQL views inside one batch transaction."""

    def execute(self, sql: str, params: Params = None) -> None:
        """Queue one write (sent pipelined; errors surface by the end of the batch)."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> None:
        """Queue the same statement for many rows."""

    def fetchall(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Read now, seeing this batch's earlier writes."""

    def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        """Read one row now, seeing this batch's earlier writes."""


class PgHandler(Protocol):
    def __call__(self, events: Sequence[Event], view: PgView) -> None: ...


@dataclass(frozen=True)
class DocumentChange:
    """Merge mode: a document after this batch (``None``: deleted) and the events that
    changed it. A merge handler's ``handle_documents(changes, view)`` gets one per changed
    document; stale and duplicate events change nothing and reach no handler."""

    stream: str
    document: dict[str, Any] | None
    events: tuple[Event, ...]


class PgDocumentHandler(Protocol):
    def __call__(self, changes: Sequence[DocumentChange], view: PgView) -> None: ...


class PgBusinessHandler(Protocol):
    """``handle_business(events, view)``: a correlation's business events, in (ts, id) order."""

    def __call__(self, events: Sequence[Event], view: PgView) -> None: ...


@dataclass(frozen=True)
class LoadedHandler:
    """A handler function and its module's view migrations, as named in the config."""

    name: str
    handle: Callable[[Sequence[Any], Any], None]  # the view: a PgView, or a RedisView
    migrations: tuple[str, ...]
    # Merge mode: the module's ``handle_business(events, view)``, if it has one.
    business: Callable[[Sequence[Event], Any], None] | None = None


def load_handler(path: str, mode: str = "sequence") -> LoadedHandler:
    """Import ``package.module`` (its ``handle``, or ``handle_documents`` in merge mode) or
    ``package.module:function``; in merge mode also the module's ``handle_business``."""
    module_name, _, attr = path.partition(":")
    attr = attr or ("handle_documents" if mode == "merge" else "handle")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"handler module {module_name!r} cannot be imported: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"handler {path!r} has no callable {attr!r}")
    migrations = getattr(module, "MIGRATIONS", ())
    if not all(isinstance(m, str) for m in migrations):
        raise ValueError(f"{module_name}.MIGRATIONS must be a list of SQL strings")
    business = getattr(module, "handle_business", None) if mode == "merge" else None
    if business is not None and not callable(business):
        raise ValueError(f"{module_name}.handle_business must be a function")
    return LoadedHandler(path, fn, tuple(migrations), business)


def load_rule(path: str) -> Callable[..., Any]:
    """The correlation rule ``package.module:function`` (``correlation.rule``)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"correlation.rule: module {module_name!r} cannot be imported: {exc}"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"correlation.rule: module {module_name} has no {attr}")
    return fn  # type: ignore[no-any-return]
