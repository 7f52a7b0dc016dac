"""Documents merged field by field by timestamp, kept in Redis (the seed's profile question).

For a merge-mode projection with ``store: redis``: each document is stored whole as a JSON
string under ``doc:<stream>`` (``<redis.prefix>:v:<view_schema>:<version>:doc:person:1`` for stream
``person:1``), and the set ``docs`` lists the documents that exist. A deleted document's key
and member go. This is the Redis counterpart of the built-in PostgreSQL JSONB view
(``merge.view_table``): projector keeps the per-field timestamps itself, so the handler only
writes what each change leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

from projector.apply import DocumentChange
from projector.store.redis_view import RedisView


def handle_documents(changes: Sequence[DocumentChange], view: RedisView) -> None:
    """One write per changed document: its JSON, or its removal."""
    for change in changes:
        key = f"doc:{change.stream}"
        if change.document is None:
            view.delete(key)
            view.srem("docs", change.stream)
        else:
            view.set_json(key, change.document)
            view.sadd("docs", change.stream)
