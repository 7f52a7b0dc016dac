"""The PostgreSQL store's cache of the positions it wrote last (no I/O)."""

from __future__ import annotations

from projector.core.sequencer import StreamPosition
from projector.store.postgres import CONTENDED_BATCHES, PositionCache


def written(*streams: str, seq: int = 1) -> dict[str, StreamPosition]:
    return {s: StreamPosition(s, seq) for s in streams}


def test_only_the_streams_left_clean_are_kept_and_a_write_replaces_an_entry() -> None:
    """Proves a stream written with something parked (not clean) leaves the cache, not
    keeping an older clean entry that a batch would plan on."""
    cache = PositionCache()
    cache.update(written("a", "b"), {"a", "b"}, version=7)
    assert cache.get("a") == (StreamPosition("a", 1), 7)
    cache.update(written("a", "b", seq=2), {"b"}, version=9)
    assert cache.get("a") is None
    assert cache.get("b") == (StreamPosition("b", 2), 9)


def test_the_least_recently_written_go_first_at_the_bound() -> None:
    """Proves the cache stays bounded however many streams a projection has."""
    cache = PositionCache(size=3)
    cache.update(written("a", "b", "c"), {"a", "b", "c"}, version=1)
    cache.update(written("a"), {"a"}, version=2)  # a written again: now the newest
    cache.update(written("d"), {"d"}, version=3)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [s for s in "acd" if cache.get(s) is not None] == ["a", "c", "d"]


def test_after_a_refused_batch_it_rests_for_a_while_but_keeps_filling() -> None:
    """Proves the contended mode: after a refusal the cache is empty and not planned on for
    CONTENDED_BATCHES committed batches, which fill it meanwhile; a plain clear (a
    rebalance, a new connection) does not rest."""
    cache = PositionCache()
    cache.update(written("a"), {"a"}, version=1)
    cache.clear(contended=True)
    assert cache.get("a") is None
    for n in range(CONTENDED_BATCHES):
        assert not cache.usable
        cache.update(written("a"), {"a"}, version=10 + n)
    assert cache.usable
    assert cache.get("a") == (StreamPosition("a", 1), 10 + CONTENDED_BATCHES - 1)
    cache.clear()
    assert cache.usable
