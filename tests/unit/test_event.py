"""The Event envelope as a value (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from projector.core.event import Event, SourceRef


def test_an_event_is_built_by_position_or_keyword_and_stays_frozen() -> None:
    """Proves Event's own __init__ (built through its slot descriptors, for speed) makes the
    same value as the dataclass would: fields by position or keyword, defaults (a fresh
    ``meta`` per event), equality, and no assignment afterwards."""
    by_position = Event("s", 1, 5, "T", {"a": 1}, "s/1", SourceRef("t", 0, 7))
    by_keyword = Event(
        stream="s", seq=1, ts=5, type="T", data={"a": 1}, id="s/1", source=SourceRef("t", 0, 7)
    )
    assert by_position == by_keyword
    assert by_position.meta == {} and by_position.meta is not by_keyword.meta
    assert Event("s", 1, None, "", {}, "s/1", meta={"table": "x"}).meta == {"table": "x"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_position.seq = 2  # type: ignore[misc]
    assert dataclasses.replace(by_position, seq=2).seq == 2
    assert by_position.hash == Event("x", 9, 1, "T", {"a": 1}, "x/9").hash  # payload only
