"""PostgreSQL side of the outbox (docs/correlation.md, sections 5, 7 and 8): the business
events a batch queues in its transaction, and the publisher's reads and writes on a connection
of its own.

- In the batch (:func:`write_outbox`, through ``PgBatch``): one row per business event, ``on
  conflict (projection, event_id) do nothing``, so an event closed twice is queued once while
  its row is kept; a rebuild's batch writes ``held`` rows under ``<name>#rebuild`` instead,
  for its swap to hand over (and :func:`prune_held` forgets the old ones).
- The publisher (:class:`PgOutbox`): one per projection at a time, by a session advisory lock
  on its connection (a crashed publisher's session ends and frees it); it reads pending rows
  in ``seq`` order and marks the delivered ones published; the sweep deletes published rows
  after the retention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from projector.core import json_codec
from projector.store.base import OutboxMessage, OutboxRow
from projector.store.errors import StoreUnavailable

if TYPE_CHECKING:  # postgres.py delegates its batch's outbox writes here
    from projector.store.postgres import PostgresStore

log = logging.getLogger(__name__)


def write_outbox(
    conn: psycopg.Connection[TupleRow],
    schema: sql.Identifier,
    projection: str,
    messages: Sequence[OutboxMessage],
    held: bool,
) -> int:
    """Insert the messages' rows in one statement, in their order (``seq`` is the publishing
    order); returns how many were new."""
    if not messages:
        return 0
    rows = [
        {
            "id": m.event.id,
            "topic": m.topic,
            "key": m.key,
            "event": m.event.to_json(),
            "ts": m.event.ts if m.event.ts is not None else 0,
        }
        for m in messages
    ]
    cur = conn.execute(
        sql.SQL(
            "insert into {s}.outbox (projection, event_id, topic, msg_key, event, event_ts, status)"
            " select %s, r->>'id', r->>'topic', r->>'key', r->'event', (r->>'ts')::bigint, %s"
            " from jsonb_array_elements(%s::jsonb) with ordinality as x(r, n) order by n"
            " on conflict (projection, event_id) do nothing"
        ).format(s=schema),
        (projection, "held" if held else "pending", json_codec.dumps(rows).decode()),
    )
    return max(cur.rowcount, 0)


def prune_held(
    conn: psycopg.Connection[TupleRow], schema: sql.Identifier, projection: str, before_ts: int
) -> int:
    """Forget a rebuild's held business events older than ``before_ts`` (event-time ms)."""
    cur = conn.execute(
        sql.SQL(
            "delete from {s}.outbox where projection = %s and status = 'held' and event_ts < %s"
        ).format(s=schema),
        (projection, before_ts),
    )
    return max(cur.rowcount, 0)


def lock_key(schema: str, projection: str) -> str:
    """The text whose ``hashtext`` is the publisher's advisory lock: per schema too, so two
    deployments sharing a database (each its own ``postgres.schema``) do not exclude each
    other."""
    return f"projector.outbox.{schema}.{projection}"


class PgOutbox:
    """One projection's outbox on its own connection (a :class:`PostgresStore`'s). Driver
    errors become :class:`StoreUnavailable`; after one, the lock is gone with the session
    (the publisher closes it and takes the lock again)."""

    def __init__(self, store: PostgresStore, projection: str) -> None:
        self.store = store
        self.projection = projection
        self._key = lock_key(store.schema, projection)

    def _q(self, text: str) -> sql.Composed:
        return self.store._q(text)

    def try_lock(self) -> bool:
        try:
            row = self.store.conn.execute(
                "select pg_try_advisory_lock(hashtext(%s))", (self._key,)
            ).fetchone()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"outbox of {self.projection}: {exc}") from exc
        return bool(row and row[0])

    def unlock(self) -> None:
        """Release the lock; closing the connection releases it too."""
        try:
            self.store.conn.execute("select pg_advisory_unlock(hashtext(%s))", (self._key,))
        except psycopg.Error as exc:
            log.debug("outbox of %s: unlock: %s", self.projection, exc)
            self.store.close()

    def pending(self, limit: int) -> list[OutboxRow]:
        try:
            rows = self.store.conn.execute(
                self._q(
                    "select seq, event_id, topic, msg_key, event from {s}.outbox"
                    " where projection = %s and status = 'pending' order by seq limit %s"
                ),
                (self.projection, limit),
            ).fetchall()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"outbox of {self.projection}: {exc}") from exc
        return [OutboxRow(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def mark_published(self, seqs: Sequence[int], now: float) -> int:
        if not seqs:
            return 0
        try:
            cur = self.store.conn.execute(
                self._q(
                    "update {s}.outbox set status = 'published', published_at = %s,"
                    " attempts = attempts + 1 where seq = any(%s) and status = 'pending'"
                ),
                (datetime.fromtimestamp(now, UTC), list(seqs)),
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"outbox of {self.projection}: {exc}") from exc
        return max(cur.rowcount, 0)

    def sweep(self, published_before: float, limit: int = 5000) -> int:
        try:
            cur = self.store.conn.execute(
                self._q(
                    "delete from {s}.outbox where seq in (select seq from {s}.outbox"
                    " where projection = %s and status = 'published' and published_at < %s"
                    " limit %s)"
                ),
                (self.projection, datetime.fromtimestamp(published_before, UTC), limit),
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"outbox of {self.projection}: {exc}") from exc
        return max(cur.rowcount, 0)

    def figures(self) -> tuple[int, float | None]:
        """Pending rows and the oldest one's age (the database's clock, as ``created_at``)."""
        row = self.store.conn.execute(
            self._q(
                "select count(*), extract(epoch from now() - min(created_at))::float8"
                " from {s}.outbox where projection = %s and status = 'pending'"
            ),
            (self.projection,),
        ).fetchone()
        if row is None:
            return 0, None
        return int(row[0]), None if row[1] is None else max(0.0, float(row[1]))

    def close(self) -> None:
        self.store.close()
