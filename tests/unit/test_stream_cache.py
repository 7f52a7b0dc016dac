"""The Redis store's cache of stream hashes (projector.store.redis.StreamCache): bounded by
what it holds, least recently used out, and able to tell a batch planned on it whether a hash
it used was dropped as changed since."""

from __future__ import annotations

from projector.store.redis import StreamCache, _Stream


def weight(fields: dict[str, str]) -> int:
    return 64 + sum(len(n) + len(v) for n, v in fields.items())


def test_it_holds_at_most_its_size_and_drops_the_least_recently_used() -> None:
    """Proves the bound is on what the hashes hold (a parked event's value or a merge
    document weighs its length), and that a read makes a hash recent."""
    small = {"seq": "1", "v": "t1"}
    big = {"seq": "1", "p:2": "x" * 300, "v": "t2"}
    cache = StreamCache(size=2 * weight(small) + weight(big))
    cache.put("a", dict(small))
    cache.put("b", dict(small))
    cache.put("c", dict(big))
    assert len(cache) == 3
    assert cache.get("a") == small  # a is now the most recent

    cache.put("d", dict(small))

    assert cache.get("b") is None
    assert [k for k in "acd" if cache.get(k) is not None] == ["a", "c", "d"]


def test_a_batch_changing_a_cached_hash_leaves_the_cache_as_it_was() -> None:
    """Proves the cache hands out its own dict without copying it and still keeps it: a
    batch's changes to a hash it got from the cache (``_Stream``) are kept beside it, the
    hash as it stands after them is a new dict, and putting a hash again counts its weight
    once."""
    cache = StreamCache(size=weight({"seq": "2", "p:3": "{}", "v": "t"}) + 1)
    cache.put("a", {"seq": "1", "p:3": "{}", "v": "t"})
    got = cache.get("a")
    assert got is not None
    stream = _Stream("a", got)
    stream.set("seq", "9")
    stream.delete("p:3")
    assert stream.token == "t" and stream.get("seq") == "9" and stream.get("p:3") is None
    assert cache.get("a") == {"seq": "1", "p:3": "{}", "v": "t"}
    assert stream.after("u") == {"seq": "9", "v": "u"}
    assert cache.get("a") == {"seq": "1", "p:3": "{}", "v": "t"}
    cache.put("a", {"seq": "2", "v": "t"})
    assert cache.get("a") == {"seq": "2", "v": "t"} and len(cache) == 1


def test_changed_since_tells_a_batch_what_was_dropped_after_it_was_planned() -> None:
    """Proves a batch planned before a hash it used was forgotten (another writer rewrote
    it) learns so, one planned after does not, one on other hashes does not, and a clear
    (a refused batch) changes everything planned before it."""
    cache = StreamCache()
    cache.put("a", {"seq": "1"})
    before = cache.generation
    cache.forget(["a"])
    after = cache.generation

    assert cache.changed_since(before, ["a", "b"])
    assert not cache.changed_since(before, ["b"])
    assert not cache.changed_since(after, ["a"])
    cache.clear()
    assert cache.changed_since(after, ["z"])
    assert cache.get("a") is None and len(cache) == 0
