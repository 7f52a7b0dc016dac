"""``python -m bench.apply_only``: the daemon's own cost, without Kafka.

The reordered workload's messages, built in memory, go through the projection's batch
applier (decode, fence, sequence, handlers, store transaction) in batches, as
``projector run`` applies them, against the real store. It prints events per second of wall
time and per second of this process's CPU. The second figure is what to compare when changing
the hot path: it hardly moves with the machine's other load. ``--profile`` adds cProfile's
top functions.

    .venv/bin/python -m bench.apply_only --store postgres --events 100000 [--delivery in-order]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Sequence

from bench.context import batch_feeder, in_memory_config
from bench.services import resources, services
from bench.workload import generate
from projector.core.message import RawMessage
from projector.runner.daemon import collecting_less_often


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.apply_only", description=__doc__)
    p.add_argument("--store", choices=("postgres", "redis"), default="postgres")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument(
        "--delivery",
        choices=("reordered", "in-order"),
        default="reordered",
        help="the bench's reordered delivery (withheld events never come) or the log in order",
    )
    p.add_argument("--profile", action="store_true", help="print cProfile's top 25")
    args = p.parse_args(argv)
    svc = services()
    with resources(svc) as res:
        config = in_memory_config(svc, res, args.store, "apply-only")
        workload = generate(args.events, args.streams)
        delivery = workload.disordered(11) if args.delivery == "reordered" else workload.in_order()
        order = delivery.order
        messages = [
            RawMessage("apply-only", 0, offset, workload.key(i), workload.payload(i))
            for offset, i in enumerate(order)
        ]
        with batch_feeder(config, "apply-only") as (_, apply):
            profiler = cProfile.Profile() if args.profile else None
            wall, cpu = time.perf_counter(), time.process_time()
            with collecting_less_often():
                if profiler is not None:
                    profiler.enable()
                for start in range(0, len(messages), args.batch):
                    apply(messages[start : start + args.batch])
                if profiler is not None:
                    profiler.disable()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"{args.store}, {args.delivery}: {len(messages):,} messages in {wall:.2f} s: {len(messages) / wall:,.0f}/s;"
        f" {cpu:.2f} s of CPU: {len(messages) / cpu:,.0f} per CPU-second"
    )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
