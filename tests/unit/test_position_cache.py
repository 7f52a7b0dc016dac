"""The PostgreSQL store's cache of the positions it wrote last (no I/O)."""

from __future__ import annotations

from projector.core.event import Event
from projector.core.gaps import Gap
from projector.core.sequencer import StreamPosition
from projector.store.postgres import CONTENDED_BATCHES, HeldState, PositionCache


def written(*streams: str, seq: int = 1) -> dict[str, StreamPosition]:
    return {s: StreamPosition(s, seq) for s in streams}


def clean(*streams: str) -> dict[str, HeldState | None]:
    return dict.fromkeys(streams)


def holding(stream: str, *seqs: int) -> HeldState:
    """``stream`` at 1 with ``seqs`` parked (2 missing)."""
    parked = {q: Event(stream, q, q, "DEPOSITED", {}, f"{stream}/{q}") for q in seqs}
    return HeldState(parked, (Gap(stream, 2, min(seqs) - 1, 0.0),))


def test_only_the_streams_left_clean_are_kept_and_a_write_replaces_an_entry() -> None:
    """Proves a stream written with something parked (not clean) leaves the cache, not
    keeping an older clean entry that a batch would plan on."""
    cache = PositionCache()
    cache.update(written("a", "b"), clean("a", "b"), version=7)
    assert cache.get("a") == (StreamPosition("a", 1), 7, None)
    cache.update(written("a", "b", seq=2), clean("b"), version=9)
    assert cache.get("a") is None
    assert cache.get("b") == (StreamPosition("b", 2), 9, None)


def test_the_least_recently_written_go_first_at_the_bound() -> None:
    """Proves the cache stays bounded however many streams a projection has."""
    cache = PositionCache(size=3)
    cache.update(written("a", "b", "c"), clean("a", "b", "c"), version=1)
    cache.update(written("a"), clean("a"), version=2)  # a written again: now the newest
    cache.update(written("d"), clean("d"), version=3)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [s for s in "acd" if cache.get(s) is not None] == ["a", "c", "d"]


def test_after_a_refused_batch_it_rests_for_a_while_but_keeps_filling() -> None:
    """Proves the contended mode: after a refusal the cache is empty and not planned on for
    CONTENDED_BATCHES committed batches, which fill it meanwhile; a plain clear (a
    rebalance, a new connection) does not rest."""
    cache = PositionCache()
    cache.update(written("a"), clean("a"), version=1)
    cache.clear(contended=True)
    assert cache.get("a") is None
    for n in range(CONTENDED_BATCHES):
        assert not cache.usable
        cache.update(written("a"), clean("a"), version=10 + n)
    assert cache.usable
    assert cache.get("a") == (StreamPosition("a", 1), 10 + CONTENDED_BATCHES - 1, None)
    cache.clear()
    assert cache.usable


def test_a_stream_holding_a_few_parked_events_is_kept_with_them_within_the_bounds() -> None:
    """Proves what the cache holds stays bounded: a stream with parked events is kept with
    them up to ``parked_per_stream`` of its own and ``parked_size`` in all; above either it
    is dropped (read from the store next time), and the count follows every entry that
    leaves (rewritten clean, forgotten, pushed out, cleared)."""
    cache = PositionCache(size=3, parked_size=5, parked_per_stream=3)
    a, b, c = holding("a", 3, 4), holding("b", 3, 5, 6), holding("c", 3, 4, 5, 6)
    cache.update(written("a", "b", "c"), {"a": a, "b": b, "c": c}, version=1)
    assert cache.get("a") == (StreamPosition("a", 1), 1, a)
    assert cache.get("b") == (StreamPosition("b", 1), 1, b)
    assert cache.get("c") is None, "more parked than parked_per_stream"
    assert cache.parked == 5
    cache.update(written("c"), {"c": holding("c", 3)}, version=2)
    assert cache.get("c") is None and cache.parked == 5, "more than parked_size in all"
    cache.update(written("a"), clean("a"), version=3)  # a's events drained
    assert cache.get("a") == (StreamPosition("a", 1), 3, None) and cache.parked == 3
    cache.update(written("c"), {"c": holding("c", 3)}, version=4)
    assert cache.parked == 4
    cache.forget(["b"])
    assert cache.parked == 1
    cache.update(written("d", "e", "f"), clean("d", "e", "f"), version=5)  # c pushed out
    assert cache.get("c") is None and cache.parked == 0
    cache.update(written("c"), {"c": holding("c", 3)}, version=6)
    cache.clear()
    assert cache.parked == 0 and len(cache) == 0
