"""A set of seqs kept as sorted, disjoint ranges: a stream's parked seqs.

A stream whose seq 2 never came parks every later event, thousands of consecutive seqs; as
ranges they are one pair, so what a batch does with them (look one up, take one out, find the
gaps between them) costs per range, not per parked event. Pure, no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class SeqRanges:
    """A mutable set of ints as sorted, disjoint, non-adjacent inclusive ranges."""

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        """An empty set: :meth:`of` and :meth:`span` make the others."""
        self._lo: list[int] = []
        self._hi: list[int] = []

    @classmethod
    def of(cls, seqs: Iterable[int]) -> SeqRanges:
        """A new set holding ``seqs`` (a copy when ``seqs`` is a SeqRanges). Built in one
        pass over the sorted seqs, without a pair per seq: a reordered batch builds a few
        hundred of these, most of one or two seqs."""
        out = cls()
        if isinstance(seqs, SeqRanges):
            out._lo, out._hi = seqs._lo.copy(), seqs._hi.copy()
            return out
        lo_list, hi_list = out._lo, out._hi
        last = None
        for seq in sorted(seqs):
            if last is not None and seq <= last + 1:
                if seq > last:
                    hi_list[-1] = last = seq
            else:
                lo_list.append(seq)
                hi_list.append(seq)
                last = seq
        return out

    @classmethod
    def span(cls, lo: int, hi: int, without: Iterable[tuple[int, int]] = ()) -> SeqRanges:
        """``lo`` to ``hi`` (inclusive), less the ranges ``without``."""
        out = cls()
        if lo <= hi:
            out._lo.append(lo)
            out._hi.append(hi)
        for a, b in without:
            out.discard_range(a, b)
        return out

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi, strict=True))

    def _index(self, seq: int) -> int:
        """The index of the range that would hold ``seq`` (the last starting at or before it),
        -1 for none."""
        return bisect_right(self._lo, seq) - 1

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = self._index(seq)
        return i >= 0 and seq <= self._hi[i]

    def add(self, seq: int) -> None:
        i = self._index(seq)
        if i >= 0 and seq <= self._hi[i]:
            return
        joins_left = i >= 0 and self._hi[i] == seq - 1
        joins_right = i + 1 < len(self._lo) and self._lo[i + 1] == seq + 1
        if joins_left and joins_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif joins_left:
            self._hi[i] = seq
        elif joins_right:
            self._lo[i + 1] = seq
        else:
            self._lo.insert(i + 1, seq)
            self._hi.insert(i + 1, seq)

    def discard(self, seq: int) -> None:
        self.discard_range(seq, seq)

    def discard_range(self, lo: int, hi: int) -> None:
        """Take out every seq from ``lo`` to ``hi`` (inclusive)."""
        if lo > hi:
            return
        kept_lo: list[int] = []
        kept_hi: list[int] = []
        start = max(self._index(lo), 0)
        end = self._index(hi) + 1  # the ranges from start to end may overlap lo..hi
        for a, b in zip(self._lo[start:end], self._hi[start:end], strict=True):
            if a < lo:
                kept_lo.append(a)
                kept_hi.append(min(b, lo - 1))
            if b > hi:
                kept_lo.append(max(a, hi + 1))
                kept_hi.append(b)
        self._lo[start:end] = kept_lo
        self._hi[start:end] = kept_hi

    def max(self) -> int | None:
        return self._hi[-1] if self._hi else None

    def __iter__(self) -> Iterator[int]:
        for lo, hi in zip(self._lo, self._hi, strict=True):
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in zip(self._lo, self._hi, strict=True))

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeqRanges):
            return self._lo == other._lo and self._hi == other._hi
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SeqRanges({self.ranges()!r})"
