"""The Redis store keeps a stream's gap records as JSON in the stream's hash (pure)."""

from __future__ import annotations

from dataclasses import fields

from projector.core import json_codec
from projector.core.gaps import Gap
from projector.store.redis import _gap, _gap_json


def test_a_gap_is_kept_with_every_field_but_its_stream_and_reads_back_equal() -> None:
    """Proves that ``_gap_json``, spelled out field by field for speed, names every field of
    ``Gap`` but the stream (which the hash's key holds), in field order: a field added to
    ``Gap`` and forgotten there fails here instead of being dropped from the store."""
    gap = Gap("account:7", 3, 5, 1.5, 2, 2.5, 9.0, "held")
    expected = {f.name: getattr(gap, f.name) for f in fields(Gap) if f.name != "stream"}
    assert list(_gap_json(gap).items()) == list(expected.items())
    assert _gap("account:7", json_codec.loads(json_codec.dumps(_gap_json(gap)))) == gap
