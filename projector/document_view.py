"""The built-in merge-mode view: each document as JSONB in one table of the projection's view
schema, ``(id text primary key, doc jsonb, updated_at)``, so simple cases need no handler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from projector.apply import DocumentChange, LoadedHandler, PgView


def document_view(table: str) -> LoadedHandler:
    """``table`` is a validated name (letters, digits, _), safe to put in SQL."""
    upsert = (
        f'insert into "{table}" (id, doc, updated_at) values (%s, %s, now())'
        " on conflict (id) do update set doc = excluded.doc, updated_at = excluded.updated_at"
    )
    delete = f'delete from "{table}" where id = any(%s)'

    def handle_documents(changes: Sequence[DocumentChange], view: PgView) -> None:
        rows: list[tuple[Any, ...]] = [
            (c.stream, Jsonb(c.document)) for c in changes if c.document is not None
        ]
        gone = [c.stream for c in changes if c.document is None]
        if rows:
            view.executemany(upsert, rows)
        if gone:
            view.execute(delete, (gone,))

    migration = (
        f'create table "{table}" (id text primary key, doc jsonb not null,'
        " updated_at timestamptz not null default now())"
    )
    return LoadedHandler(f"projector.document_view:{table}", handle_documents, (migration,))
