"""``python -m bench.backlog``: what a batch costs as the holding table grows, without Kafka.

A few "hot" streams lose their seq 2 (``--cause missing``, as in the fault suite's backlog
test) or have it refused by the handler (``--cause poison``: a dead letter blocks the stream)
and go on sending, so every later event of theirs parks; the other streams apply normally. Their messages,
built in memory, go through the projection's batch applier into the real store in batches of
2,000, as ``projector run`` applies them. Every ``--every`` batches it prints the parked
count, the batch's time, and the part of it spent reading the batch's parked seqs
(``held_seqs``): a cost per batch that grows with the backlog shows here as a rising line.

    .venv/bin/python -m bench.backlog --store postgres [--events 220000] [--hot 20]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from bench.context import PROJECTION, batch_feeder, in_memory_config
from bench.services import resources, services
from projector.core.message import RawMessage
from projector.runner.daemon import collecting_less_often
from projector.store.postgres import PgBatch
from projector.store.redis import RedisBatch


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__)
    p.add_argument("--store", choices=("postgres", "redis"), default="postgres")
    p.add_argument("--events", type=int, default=220_000)
    p.add_argument("--hot", type=int, default=20, help="streams that lose their seq 2")
    p.add_argument("--streams", type=int, default=2_000)
    p.add_argument("--every", type=int, default=10, help="print every N batches")
    p.add_argument(
        "--cause",
        choices=("missing", "poison"),
        default="missing",
        help="seq 2 of the hot streams never comes, or comes with a negative amount",
    )
    args = p.parse_args(argv)
    svc = services()
    held = _timed(PgBatch if args.store == "postgres" else RedisBatch)
    with resources(svc) as res:
        config = in_memory_config(svc, res, args.store, "backlog", max_parked=10 * args.events)
        messages = _messages(args.events, args.hot, args.streams, args.cause == "poison")
        with batch_feeder(config, "backlog") as (store, apply), collecting_less_often():
            for n, start in enumerate(range(0, len(messages), 2000)):
                held["seconds"] = 0.0
                began = time.perf_counter()
                apply(messages[start : start + 2000])
                took = time.perf_counter() - began
                if n % args.every == 0:
                    print(
                        f"{store.count_parked(PROJECTION):7,} parked: batch {took * 1000:6.1f}"
                        f" ms, reading its parked seqs {held['seconds'] * 1000:5.1f} ms"
                    )
    return 0


def _messages(count: int, hot: int, streams: int, poison: bool) -> list[RawMessage]:
    """Hot streams send about as many events as all the others together; seq 2 of each hot
    stream never comes, or (``poison``) comes with an amount the handler refuses."""
    rng = random.Random(1)
    names = [f"account:{n}" for n in range(streams)]
    seqs: Counter[str] = Counter()
    out: list[RawMessage] = []
    while len(out) < count:
        stream = rng.choice(names[:hot] if rng.random() < 0.45 else names[hot:])
        seqs[stream] += 1
        seq = seqs[stream]
        bad = stream in names[:hot] and seq == 2
        if bad and not poison:
            continue
        opened = seq == 1
        event = {
            "stream": stream,
            "seq": seq,
            "type": "OPENED" if opened else "DEPOSITED",
            "ts": seq,
            "data": {"owner": "o"} if opened else {"amount": -5 if bad else 1},
        }
        out.append(RawMessage("backlog", 0, len(out), stream.encode(), json.dumps(event).encode()))
    return out


def _timed(batch_class: Any) -> dict[str, float]:
    """Adds the time spent in ``held_seqs`` to the returned dict's "seconds"."""
    spent = {"seconds": 0.0}
    inner: Callable[..., Any] = batch_class.held_seqs

    def held_seqs(self: Any, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - began

    setattr(batch_class, "held_seqs", held_seqs)  # noqa: B010
    return spent


if __name__ == "__main__":
    raise SystemExit(main())
