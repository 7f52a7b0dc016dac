"""The benchmark's workload: bank-account events, interleaved across streams as a live system
produces them, and the two ways they are delivered (in order; or late, duplicated and withheld).

Pure and deterministic per seed: no I/O. Every stream is an account (``account:<n>``): OPENED
{owner}, then DEPOSITED / WITHDRAWN {amount}. A withdrawal never exceeds the balance, so the
view each run builds (a running balance and an event count per account) has one right answer,
:meth:`Workload.expected`, whatever store or method wrote it.

The log goes round the streams: round ``r`` holds the ``r``-th event of every stream still
going, in a fresh random order each round. So 2,000 consecutive events touch about 2,000
distinct streams, as on a live topic; events grouped by stream would flatter every figure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import orjson

OPENED, DEPOSITED, WITHDRAWN = 0, 1, 2
TYPE_NAMES = ("OPENED", "DEPOSITED", "WITHDRAWN")
BASE_TS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
EVENT_BYTES = 200  # every payload is padded to this size
_NAMES = ("Ada Okafor", "Bram Novak", "Chen Silva", "Dara Moreau", "Emil Tanaka", "Fatou Haddad")
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 4


@dataclass(frozen=True)
class Row:
    """One account as the view must hold it after the whole log."""

    owner: str
    balance: int
    deposits: int
    withdrawals: int
    events: int
    last_seq: int


@dataclass(frozen=True)
class Delivery:
    """An order in which the events reach the topic: indices into the workload's log."""

    name: str
    order: list[int]  # as published, duplicates included, withheld ones left out
    withheld: list[int]  # never published: only a replay brings them
    late: int  # events published after their stream's next one
    duplicates: int


@dataclass(frozen=True)
class Workload:
    """``len(stream)`` events over ``streams`` accounts, in log order (index = position)."""

    streams: int
    stream: list[int]  # per event: its account number, 1..streams
    seq: list[int]
    kind: list[int]  # OPENED, DEPOSITED or WITHDRAWN
    amount: list[int]  # cents; 0 for OPENED
    of_stream: list[list[int]]  # per account number: its events' indices in seq order

    def __len__(self) -> int:
        return len(self.stream)

    def owner(self, account: int) -> str:
        return _NAMES[account % len(_NAMES)]

    def payload(self, i: int, ts: int | None = None) -> bytes:
        """Event ``i`` as JSON, ``EVENT_BYTES`` long, with event time ``ts`` (epoch ms;
        default: a fixed time derived from its position)."""
        account, kind = self.stream[i], self.kind[i]
        data: dict[str, object] = (
            {"owner": self.owner(account)} if kind == OPENED else {"amount": self.amount[i]}
        )
        data |= {"currency": "EUR", "ref": f"tx-{account:07d}-{self.seq[i]:05d}", "note": ""}
        event = {
            "stream": f"account:{account}",
            "seq": self.seq[i],
            "type": TYPE_NAMES[kind],
            "ts": BASE_TS + i if ts is None else ts,
            "data": data,
        }
        raw = orjson.dumps(event)
        pad = max(0, EVENT_BYTES - len(raw))
        return raw.replace(b'"note":""', b'"note":"' + _FILLER[:pad].encode() + b'"', 1)

    def key(self, i: int) -> bytes:
        return f"account:{self.stream[i]}".encode()

    def expected(self, upto: int | None = None) -> dict[str, Row]:
        """The view's rows after the first ``upto`` events of the log (default: all), by
        account id (the number as text)."""
        rows: dict[str, Row] = {}
        for i in range(len(self) if upto is None else upto):
            aid = str(self.stream[i])
            row = rows.get(aid)
            kind, amount = self.kind[i], self.amount[i]
            if row is None:
                row = Row(self.owner(self.stream[i]), 0, 0, 0, 0, 0)
            deposit = amount if kind == DEPOSITED else 0
            withdrawal = amount if kind == WITHDRAWN else 0
            rows[aid] = Row(
                row.owner,
                row.balance + deposit - withdrawal,
                row.deposits + deposit,
                row.withdrawals + withdrawal,
                row.events + 1,
                self.seq[i],
            )
        return rows

    def in_order(self) -> Delivery:
        return Delivery("in order", list(range(len(self))), [], 0, 0)

    def disordered(
        self,
        seed: int,
        late: float = 0.05,
        duplicates: float = 0.01,
        withheld: float = 0.001,
    ) -> Delivery:
        """``late`` of each stream's events published after its next one, ``duplicates`` of
        all published again later, ``withheld`` never published (neither the first nor the
        last of its stream: nothing could tell that a stream's newest event is missing)."""
        rng = random.Random(seed)
        slots = list(range(len(self)))
        moved = 0
        for events in self.of_stream:
            for j in _late_pairs(rng, len(events), late):
                a, b = events[j], events[j + 1]  # a pair never shares a slot with another
                slots[a], slots[b] = slots[b], slots[a]
                moved += 1
        copies = _with_duplicates(rng, slots, duplicates)
        candidates = [
            i for i in range(len(self)) if 1 < self.seq[i] < len(self.of_stream[self.stream[i]])
        ]
        held = set(rng.sample(candidates, min(len(candidates), round(withheld * len(self)))))
        order = [i for i in copies if i not in held]
        dups = len(copies) - len(slots)
        return Delivery("reordered", order, sorted(held), moved, dups)


def _late_pairs(rng: random.Random, count: int, fraction: float) -> list[int]:
    """Positions ``j`` whose event and ``j + 1``'s swap places; never two adjacent ones, so
    each swap makes exactly one event late. Rounded at random: 10 events and 5% make one swap
    in half the streams."""
    if count < 2:
        return []
    wanted = int(fraction * count + rng.random())
    chosen: set[int] = set()
    for j in rng.sample(range(count - 1), count - 1):
        if len(chosen) >= wanted:
            break
        if j - 1 not in chosen and j + 1 not in chosen:
            chosen.add(j)
    return sorted(chosen)


def _with_duplicates(rng: random.Random, items: list[int], fraction: float) -> list[int]:
    """``items`` with ``fraction`` of them published again somewhere after the original, as
    a redelivery would be."""
    n = len(items)
    after: dict[int, list[int]] = {}
    for p in rng.sample(range(n), min(n, round(fraction * n))):
        after.setdefault(rng.randrange(p, n), []).append(items[p])
    out: list[int] = []
    for p, item in enumerate(items):
        out.append(item)
        out.extend(after.get(p, ()))
    return out


def generate(events: int, streams: int, seed: int = 11) -> Workload:
    """``events`` events over ``streams`` accounts, interleaved round by round."""
    rng = random.Random(seed)
    per, extra = divmod(events, streams)
    counts = [0] + [per + (1 if n <= extra else 0) for n in range(1, streams + 1)]
    balance = [0] * (streams + 1)
    w = Workload(streams, [], [], [], [], [[] for _ in range(streams + 1)])
    for r in range(max(counts)):
        active = [n for n in range(1, streams + 1) if counts[n] > r]
        rng.shuffle(active)
        for n in active:
            kind, amount = _next_event(rng, r, balance[n])
            balance[n] += amount if kind == DEPOSITED else -amount
            w.of_stream[n].append(len(w.stream))
            w.stream.append(n)
            w.seq.append(r + 1)
            w.kind.append(kind)
            w.amount.append(amount)
    return w


def _next_event(rng: random.Random, r: int, balance: int) -> tuple[int, int]:
    if r == 0:
        return OPENED, 0
    if balance == 0 or rng.random() < 0.55:
        return DEPOSITED, rng.randint(100, 50_000)
    return WITHDRAWN, rng.randint(1, balance)
