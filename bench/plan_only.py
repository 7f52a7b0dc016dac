"""``python -m bench.plan_only``: the daemon's pure Python per event, no store, no Kafka.

The in-order workload's messages, built in memory, are decoded and sequenced batch by batch
as the batch applier does before it writes (decode, group by stream, plan each stream from its
position, the payload hash of each stream's last event), against positions kept in a dict. It
prints microseconds per event, the best of ``--repeat`` passes: a figure that hardly moves
with the machine's other load, for comparing a change of the hot path side by side (run it on
both versions, alternately).

    .venv/bin/python -m bench.plan_only [--events 40000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from bench.context import HANDLERS, PROJECTION, WIRE_DECODER
from bench.workload import generate
from projector.config import parse_config
from projector.core.decode import Decoder
from projector.core.message import RawMessage
from projector.core.sequencer import (
    SequenceRules,
    StreamPosition,
    group_by_stream,
    sequence_stream,
)
from projector.runner.batch import decode_all
from projector.runner.daemon import collecting_less_often
from projector.runner.worker import build_decoders


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_only", description=__doc__)
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args(argv)
    data = {
        "kafka": {"bootstrap_servers": "unused:9092", "group_prefix": "plan-only"},
        "postgres": {"dsn": "postgresql://unused"},
        "metrics": {"enabled": False},
        "projections": [
            {
                "name": PROJECTION,
                "store": "postgres",
                "view_schema": PROJECTION,
                "topics": ["plan-only"],
                "handlers": [HANDLERS["postgres"]],
                "decoder": {**WIRE_DECODER, "data": "data"},
            }
        ],
    }
    decoders = build_decoders(parse_config(data, env={}).projections[0])
    workload = generate(args.events, args.streams)
    messages = [
        RawMessage("plan-only", 0, offset, workload.key(i), workload.payload(i))
        for offset, i in enumerate(workload.in_order().order)
    ]
    # The first half sets the positions the second half is planned from, as a running
    # projection's would be; only the second half is timed.
    half = len(messages) // 2
    before = {e.stream: e.seq or 0 for e in decode_all(messages[:half], decoders).events}
    batches = [messages[s : s + args.batch] for s in range(half, len(messages), args.batch)]
    timed = len(messages) - half
    # Under the daemon's collector thresholds: at Python's default the collector ran every
    # few hundred messages and was a third of the figure, a cost the daemon does not have.
    with collecting_less_often():
        best = min(_pass(batches, decoders, before) for _ in range(args.repeat)) / timed
    print(f"decode and plan, in order: {best * 1e6:.2f} us per event (best of {args.repeat})")
    return 0


def _pass(
    batches: list[list[RawMessage]], decoders: dict[str, Decoder], before: dict[str, int]
) -> float:
    rules = SequenceRules()
    last = dict(before)
    started = time.perf_counter()
    for batch in batches:
        incoming = group_by_stream(decode_all(batch, decoders).events)
        for stream, events in incoming.items():
            position = StreamPosition(stream, last.get(stream, 0))
            plan = sequence_stream(position, {}, events, rules)
            last[stream] = plan.position.last_seq
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
