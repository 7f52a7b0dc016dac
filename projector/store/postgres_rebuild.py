"""PostgreSQL side of ``projector rebuild``: a shadow schema, the rebuild's own state, the swap.

While it runs, the rebuild is a projection of its own to the store: its state (positions,
holding, gaps, documents, correlations, dead letters, checkpoints with their event-time
progress) lives under ``<name>#rebuild`` in projector's tables and its views in the schema ``<view_schema>__rebuild``, built by the same
handlers (their SQL never names a schema). The swap, in one transaction:

1. locks the live projection's checkpoint rows (``lock_timeout`` bounds the wait): a live
   batch in flight finishes first, the next ones wait at their fence;
2. lets the caller apply what the live projection has read and the rebuild not yet, so both
   stand at the same offsets;
3. hands the rebuild's held business events over to the outbox (those the live run still owed;
   see :meth:`PgRebuildStore._hand_over_outbox`), then replaces the live state rows by the
   rebuild's (the live checkpoints keep their epochs, so the running daemon goes on without a
   rebalance, from the rebuilt state);
4. renames the live schema to ``<view_schema>__old`` and the shadow to the live name, gives the
   new tables the live ones' grants, and re-points views in other schemas that used them.
Readers never see a half-built view: a statement resolves names when it starts, so it reads
either the old tables or the new ones, whole. The old schema is dropped afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from projector.store.base import REBUILD, LivePartition, NotCaughtUp, RebuildRunning, TopicPartition
from projector.store.migrate import ViewMigrations
from projector.store.postgres import PostgresStore

log = logging.getLogger(__name__)

_STATE_TABLES = ("positions", "holding", "gaps", "documents", "correlations")


def rebuild_name(projection: str) -> str:
    """The name the rebuild's own state goes by in projector's tables."""
    return f"{projection}{REBUILD}"


def shadow_schema(view_schema: str) -> str:
    return f"{view_schema}__rebuild"


def old_schema(view_schema: str) -> str:
    return f"{view_schema}__old"


class PgRebuildStore:
    """The store operations of one projection's rebuild, on the rebuild's own connection."""

    def __init__(self, store: PostgresStore, projection: str, view_schema: str) -> None:
        self.store = store
        self.projection = projection
        self.name = rebuild_name(projection)
        self.view_schema = view_schema
        self.shadow = shadow_schema(view_schema)
        self.old = old_schema(view_schema)
        self._lock_conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def _q(self, text: str) -> sql.Composed:
        return self.store._q(text)

    # -- one rebuild at a time ------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the projection's rebuild lock (a session advisory lock on a connection of its
        own, so a killed rebuild releases it) for the block."""
        conn = psycopg.connect(
            self.store.dsn, autocommit=True, application_name="projector-rebuild"
        )
        key = f"projector.rebuild.{self.store.schema}.{self.projection}"
        row = conn.execute("select pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not row or not row[0]:
            holder = conn.execute(
                "select a.pid, a.client_addr, a.backend_start from pg_locks l"
                " join pg_stat_activity a on a.pid = l.pid where l.locktype = 'advisory'"
                " and l.objid = hashtext(%s)::oid and l.granted limit 1",
                (key,),
            ).fetchone()
            conn.close()
            who = "" if holder is None else f" (backend pid {holder[0]}, since {holder[2]:%c})"
            raise RebuildRunning(
                f"another rebuild of {self.projection} is running{who}; wait for it, or stop it"
                " (it resumes where it stopped when started again)"
            )
        try:
            yield
        finally:
            conn.close()

    # -- what there is ----------------------------------------------------------------------
    def live_partitions(self) -> dict[TopicPartition, LivePartition]:
        rows = self.store.conn.execute(
            self._q(
                "select topic, partition, next_offset, start_offset from {s}.checkpoints"
                " where projection = %s"
            ),
            (self.projection,),
        ).fetchall()
        return {(r[0], r[1]): LivePartition(r[2], r[3]) for r in rows}

    def in_progress(self) -> bool:
        row = self.store.conn.execute(
            self._q("select 1 from {s}.rebuilds where projection = %s"), (self.projection,)
        ).fetchone()
        return row is not None and self._schema_exists(self.shadow)

    def _schema_exists(self, name: str) -> bool:
        row = self.store.conn.execute(
            "select 1 from pg_namespace where nspname = %s", (name,)
        ).fetchone()
        return row is not None

    # -- start ------------------------------------------------------------------------------
    def start(self, views: Sequence[ViewMigrations]) -> None:
        """A fresh shadow: an empty schema with the handlers' migrations applied, and no
        rebuild state. Anything left by an earlier rebuild goes first."""
        conn = self.store.conn
        with conn.transaction():
            self._forget(conn)
            conn.execute(sql.SQL("create schema {}").format(sql.Identifier(self.shadow)))
            conn.execute(
                "select set_config('search_path', %s, true)",
                (sql.Identifier(self.shadow).as_string(conn),),
            )
            for v in views:
                for statement in v.statements:
                    conn.execute(sql.SQL(statement))
            conn.execute(
                self._q("insert into {s}.rebuilds (projection, shadow_schema) values (%s, %s)"),
                (self.projection, self.shadow),
            )

    def abandon(self) -> None:
        """Drop the shadow and the rebuild's state (``--restart``)."""
        with self.store.conn.transaction():
            self._forget(self.store.conn)

    def _forget(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        for name in (self.shadow, self.old):
            conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(name)))
        for table in (*_STATE_TABLES, "dead_letters", "checkpoints"):
            conn.execute(self._q(f"delete from {{s}}.{table} where projection = %s"), (self.name,))
        if self.store.has_outbox():  # the rebuild's held business events
            conn.execute(self._q("delete from {s}.outbox where projection = %s"), (self.name,))
        conn.execute(self._q("delete from {s}.rebuilds where projection = %s"), (self.projection,))

    # -- the swap ---------------------------------------------------------------------------
    def swap(
        self,
        catch_up: Callable[[Mapping[TopicPartition, int]], None],
        lock_timeout: float,
        partitions: Sequence[TopicPartition],
    ) -> dict[TopicPartition, int]:
        """Swap the rebuilt views and state in, in one transaction (see the module docstring).
        ``catch_up(targets)`` must bring the rebuild to at least ``targets`` (the live next
        offsets), applying on this store's connection, or raise :class:`NotCaughtUp`. Only the
        checkpoints of ``partitions`` (those the live projection consumes; a history topic read
        for the rebuild is not one) are carried over. Returns the checkpoints the live
        projection goes on from."""
        conn = self.store.conn
        with conn.transaction():
            conn.execute(
                "select set_config('lock_timeout', %s, true)", (f"{int(lock_timeout * 1000)}ms",)
            )
            live = conn.execute(
                self._q(
                    "select topic, partition, coalesce(next_offset, 0) from {s}.checkpoints"
                    " where projection = %s order by topic, partition for update"
                ),
                (self.projection,),
            ).fetchall()
            targets = {(t, p): int(o) for t, p, o in live}
            catch_up(targets)
            consumed = set(partitions)
            rebuilt = {tp: o for tp, o in self._rebuilt_checkpoints(conn).items() if tp in consumed}
            behind = [tp for tp, o in targets.items() if rebuilt.get(tp, 0) < o]
            if behind:
                raise NotCaughtUp(f"the rebuild is behind on {behind}")
            if self.store.has_outbox():
                self._hand_over_outbox(conn)
            self._swap_state(conn, rebuilt)
            self._swap_schemas(conn)
            conn.execute(
                self._q("delete from {s}.rebuilds where projection = %s"), (self.projection,)
            )
        return {tp: max(o, targets.get(tp, 0)) for tp, o in rebuilt.items()}

    def _rebuilt_checkpoints(
        self, conn: psycopg.Connection[tuple[Any, ...]]
    ) -> dict[TopicPartition, int]:
        rows = conn.execute(
            self._q(
                "select topic, partition, next_offset from {s}.checkpoints"
                " where projection = %s and next_offset is not null"
            ),
            (self.name,),
        ).fetchall()
        return {(t, p): int(o) for t, p, o in rows}

    def _hand_over_outbox(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        """The rebuild's held business events that the live run still owes become pending live
        rows, in the order they were named; then every held row of the rebuild goes.

        Owed, by the live state read before it is replaced: the event's correlation key is
        still open there (parts or an END record waiting: the live run would close it and
        publish), or the live run has no closed window of the key at all (the rebuild read
        further than the live run had, and the daemon goes on from there past those parts, so
        it would never name it). A key the live run closed, with nothing open, was published
        by the live run, under the id its parts gave. ``on conflict do nothing``: an event
        queued or published already keeps its row. Returns how many rows were queued."""
        cur = conn.execute(
            self._q(
                "insert into {s}.outbox (projection, event_id, topic, msg_key, event, event_ts,"
                " status) select %s, h.event_id, h.topic, h.msg_key, h.event, h.event_ts,"
                " 'pending' from {s}.outbox h where h.projection = %s and h.status = 'held'"
                " and not exists (select 1 from {s}.correlations c where c.projection = %s"
                "  and c.key = h.event->'meta'->>'key' and c.record->'parts' = '{{}}'::jsonb"
                "  and coalesce(c.record->'end', 'null'::jsonb) = 'null'::jsonb"
                "  and jsonb_array_length(coalesce(c.record->'closed', '[]'::jsonb)) > 0)"
                " order by h.seq on conflict (projection, event_id) do nothing"
            ),
            (self.projection, self.name, self.projection),
        )
        queued = max(cur.rowcount, 0)
        conn.execute(self._q("delete from {s}.outbox where projection = %s"), (self.name,))
        if queued:
            log.info("rebuild %s: %d business event(s) queued at the swap", self.projection, queued)
        return queued

    def _swap_state(
        self, conn: psycopg.Connection[tuple[Any, ...]], rebuilt: Mapping[TopicPartition, int]
    ) -> None:
        for table in _STATE_TABLES:
            conn.execute(
                self._q(f"delete from {{s}}.{table} where projection = %s"), (self.projection,)
            )
            conn.execute(
                self._q(f"update {{s}}.{table} set projection = %s where projection = %s"),
                (self.projection, self.name),
            )
        # The live dead letters described the old state; the rebuild's describe the new one.
        conn.execute(
            self._q(
                "update {s}.dead_letters set status = 'superseded', resolved_at = now()"
                " where projection = %s and status = 'open'"
            ),
            (self.projection,),
        )
        conn.execute(
            self._q("update {s}.dead_letters set projection = %s where projection = %s"),
            (self.projection, self.name),
        )
        # The live rows keep their epochs and owners: the running daemon is not fenced. A
        # correlation's event-time progress moves with the offsets and never goes back (the
        # live high may be ahead: raised by the idle clock); ``caught_up`` stays the live
        # owner's, who reads Kafka and sets it again on its next batch.
        for (topic, part), offset in sorted(rebuilt.items()):
            conn.execute(
                self._q(
                    "insert into {s}.checkpoints (projection, topic, partition, next_offset,"
                    " start_offset, event_time_high) select %s, %s, %s, %s, start_offset,"
                    " event_time_high from {s}.checkpoints"
                    " where projection = %s and topic = %s and partition = %s"
                    " on conflict (projection, topic, partition) do update set"
                    " next_offset = greatest(coalesce({s}.checkpoints.next_offset, 0),"
                    " excluded.next_offset), event_time_high = greatest("
                    "{s}.checkpoints.event_time_high, excluded.event_time_high),"
                    " updated_at = now()"
                ),
                (self.projection, topic, part, offset, self.name, topic, part),
            )
        conn.execute(self._q("delete from {s}.checkpoints where projection = %s"), (self.name,))

    def _swap_schemas(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        live, shadow, old = (sql.Identifier(n) for n in (self.view_schema, self.shadow, self.old))
        # Qualified names in view definitions: print them with no schema on the search path.
        conn.execute("select set_config('search_path', '', true)")
        dependents = conn.execute(
            "select distinct v.oid, vn.nspname, v.relname, pg_get_viewdef(v.oid)"
            " from pg_depend d join pg_rewrite r on r.oid = d.objid"
            " join pg_class v on v.oid = r.ev_class join pg_namespace vn on vn.oid = v.relnamespace"
            " join pg_class t on t.oid = d.refobjid join pg_namespace tn on tn.oid = t.relnamespace"
            " where tn.nspname = %s and vn.nspname <> %s and v.relkind = 'v' and v.oid <> t.oid",
            (self.view_schema, self.view_schema),
        ).fetchall()
        grants = self._grants(conn)
        conn.execute(sql.SQL("alter schema {} rename to {}").format(live, old))
        conn.execute(sql.SQL("alter schema {} rename to {}").format(shadow, live))
        for statement in grants:
            conn.execute(statement)
        for _oid, schema, name, definition in dependents:
            conn.execute(
                sql.SQL("create or replace view {}.{} as ").format(
                    sql.Identifier(schema), sql.Identifier(name)
                )
                + sql.SQL(definition)
            )

    def _grants(self, conn: psycopg.Connection[tuple[Any, ...]]) -> list[sql.Composed]:
        """The live schema's and its relations' grants (beyond their owner's), as statements for
        the same names in the new schema."""
        live = sql.Identifier(self.view_schema)
        out: list[sql.Composed] = []
        for privilege, grantee, grantable in conn.execute(
            "select a.privilege_type, coalesce(r.rolname, 'public'), a.is_grantable"
            " from pg_namespace n, aclexplode(n.nspacl) a left join pg_roles r on r.oid = a.grantee"
            " where n.nspname = %s and a.grantee <> n.nspowner",
            (self.view_schema,),
        ).fetchall():
            out.append(
                sql.SQL("grant {} on schema {} to {}{}").format(
                    sql.SQL(privilege), live, _grantee(grantee), _option(grantable)
                )
            )
        for relname, relkind, privilege, grantee, grantable in conn.execute(
            "select c.relname, c.relkind, a.privilege_type, coalesce(r.rolname, 'public'),"
            " a.is_grantable from pg_class c join pg_namespace n on n.oid = c.relnamespace,"
            " aclexplode(c.relacl) a left join pg_roles r on r.oid = a.grantee"
            " where n.nspname = %s and c.relacl is not null and a.grantee <> c.relowner",
            (self.view_schema,),
        ).fetchall():
            kind = sql.SQL("sequence " if relkind == "S" else "")
            out.append(
                sql.SQL("grant {} on {}{}.{} to {}{}").format(
                    sql.SQL(privilege),
                    kind,
                    live,
                    sql.Identifier(relname),
                    _grantee(grantee),
                    _option(grantable),
                )
            )
        return out

    def drop_old(self, lock_timeout: float) -> bool:
        """Drop the swapped-out schema; False while readers still hold its tables (try again
        later: they finish on the old tables, whole)."""
        conn = self.store.conn
        try:
            with conn.transaction():
                conn.execute(
                    "select set_config('lock_timeout', %s, true)",
                    (f"{int(lock_timeout * 1000)}ms",),
                )
                conn.execute(
                    sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(self.old))
                )
            return True
        except psycopg.errors.LockNotAvailable:
            return False


def _grantee(name: str) -> sql.Composable:
    return sql.SQL("public") if name == "public" else sql.Identifier(name)


def _option(grantable: bool) -> sql.Composable:
    return sql.SQL(" with grant option" if grantable else "")
