"""A merge handler for tests: the built-in JSONB view, except that documents with a ``poison``
field raise until the bug is "fixed" (``BROKEN["on"] = False``)."""

from __future__ import annotations

from collections.abc import Sequence

from projector.apply import DocumentChange, PgView
from projector.document_view import document_view

_VIEW = document_view("docs")
MIGRATIONS = list(_VIEW.migrations)
BROKEN = {"on": True}


def handle_documents(changes: Sequence[DocumentChange], view: PgView) -> None:
    for change in changes:
        if change.document and change.document.get("poison") and BROKEN["on"]:
            raise RuntimeError(f"handler bug on {change.stream}")
    _VIEW.handle(changes, view)
