"""``python -m bench.run``: every measurement of issue 11 in one invocation, side by side.

Per store (PostgreSQL, then Redis), on topics of their own: the reordered workload (late,
duplicated, withheld and filled by replay) and the in-order one, through projector as a real
process; one process with two ``consumers`` on the reordered workload; for PostgreSQL also two
processes in one consumer group; then the limits (a) consume-only, (b) store-only, (c) naive,
(e) the bare pipeline in one and two processes; and on PostgreSQL (d) the peer, Quix Streams,
on both topics. Then produce→view latency at
half the single-process throughput of each store. Every run gets its own topics, database
and Redis prefix, removed after it. Prints the tables; writes ``results.json``,
``bench.png`` and ``table.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import baselines, cpu, report
from bench.bare import bare_pipeline
from bench.context import EVENT_STORE, Context
from bench.latency import measure_latency
from bench.peer import quix_peer
from bench.projector_runs import run_projector
from bench.report import SHORT
from bench.services import ROOT, publish, resources, services, store_events
from bench.workload import Delivery, generate

PARTS = ("runs", "consumers", "two", "parked", "baselines", "peer", "latency")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    p.add_argument("--streams", type=int, default=10_000, help="streams (accounts)")
    p.add_argument("--out", type=Path, default=ROOT / ".dev/bench", help="where results go")
    p.add_argument("--stores", default="postgres,redis", help="postgres, redis or both")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)}")
    p.add_argument("--partitions", type=int, default=4, help="partitions of each source topic")
    p.add_argument("--batch", type=int, default=2000, help="batch_max_messages")
    p.add_argument("--gap-timeout", type=float, default=5.0, help="seconds before a replay request")
    p.add_argument(
        "--parked-gap-timeout",
        type=float,
        default=30.0,
        help="gap_timeout of the parked run (projector's default): what piles up meanwhile",
    )
    p.add_argument("--baseline-events", type=int, default=200_000, help="events for (b)")
    p.add_argument("--naive-events", type=int, default=50_000, help="events for (c)")
    p.add_argument("--latency-seconds", type=float, default=30.0, help="length of a latency run")
    p.add_argument(
        "--latency-rate",
        type=float,
        help="offered events/s of the latency runs (default: half the reordered run's rate)",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--consumer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting for projector's consumer (to try one; repeatable)",
    )
    p.add_argument(
        "--consumers",
        type=int,
        default=1,
        help="the projection's consumers (Kafka consumers in one daemon process)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the first process of each run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    console = Console(record=True, width=230)
    stores = [s for s in args.stores.split(",") if s]
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _warn_if_busy(console)
    ctx = _context(args, console)
    w = ctx.workload
    reordered = w.disordered(args.seed)
    params = _params(args, reordered)
    ctx.say(f"workload: {params}")
    results = report.Results(params)
    with resources(ctx.svc) as shared:
        ctx.events_dsn = shared.database()
        store_events(ctx.events_dsn, w, ctx.payloads, *EVENT_STORE)
        for store in stores:
            _measure_store(ctx, results, store, parts, reordered, args)
    if "latency" in parts:
        for store in stores:
            main_run = results.run(f"{SHORT[store]} reordered")
            rate = args.latency_rate or (main_run.rate / 2 if main_run else 0.0)
            if rate > 0:
                results.latency.append(measure_latency(ctx, store, rate, args.latency_seconds))
    report.show(results, console)
    report.write_json(results, args.out / "results.json")
    if results.runs:
        report.chart(results, args.out / "bench.png")
    console.print(f"took {time.monotonic() - started:.0f}s; chart, results: {args.out}")
    (args.out / "table.txt").write_text(console.export_text())
    wrong = [r.name for r in results.runs if r.problems]
    wrong += [f"{lat.store} latency" for lat in results.latency if lat.problems or lat.unseen]
    if wrong:
        console.print(f"[red]not right: {', '.join(wrong)}[/] (logs in {args.out})")
    return 1 if wrong else 0


def _warn_if_busy(console: Console) -> None:
    """Two cores are little: anything else running skews every figure, so say so."""
    before = cpu.snapshot({})["machine"]
    time.sleep(2)
    busy = (cpu.snapshot({})["machine"] - before) / 2
    if busy > 0.25:
        console.log(
            f"[yellow]the machine is already {100 * busy:.0f}% of a core busy before the run:"
            " every figure will suffer (see 'other' in the CPU column)[/]"
        )


def _context(args: argparse.Namespace, console: Console) -> Context:
    console.log(f"generating {args.events:,} events over {args.streams:,} streams")
    w = generate(args.events, args.streams, args.seed)
    return Context(
        svc=services(),
        workload=w,
        payloads=[w.payload(i) for i in range(len(w))],
        keys=[w.key(i) for i in range(len(w))],
        out=args.out,
        partitions=args.partitions,
        gap_timeout=args.gap_timeout,
        batch_size=args.batch,
        consumer=dict(_setting(kv) for kv in args.consumer),
        consumers=args.consumers,
        profile=args.profile,
        console=console,
    )


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def _params(args: argparse.Namespace, reordered: Delivery) -> dict[str, Any]:
    return {
        "events": args.events,
        "streams": args.streams,
        "partitions": args.partitions,
        "batch": args.batch,
        "gap_timeout_s": args.gap_timeout,
        "late": reordered.late,
        "duplicates": reordered.duplicates,
        "withheld": len(reordered.withheld),
        "consumer": args.consumer,
        "baseline_events": args.baseline_events,
        "naive_events": args.naive_events,
    }


def _measure_store(
    ctx: Context,
    results: report.Results,
    store: str,
    parts: set[str],
    reordered: Delivery,
    args: argparse.Namespace,
) -> None:
    short = SHORT[store]
    in_order = ctx.workload.in_order()
    with resources(ctx.svc) as topics:

        def published(delivery: Delivery) -> str:
            topic = topics.topic(ctx.partitions)
            publish(ctx.svc.kafka, topic, ctx.payloads, ctx.keys, delivery.order)
            return topic

        ctx.say(f"{store}: publishing the workload")
        mixed, ordered = published(reordered), published(in_order)
        found = results.baselines.setdefault(store, [])
        if "baselines" in parts:
            ctx.say(f"{store}: (a) consume-only")
            found.append(baselines.consume_only(ctx.svc, mixed, len(reordered.order)))
        if "runs" in parts:
            results.runs.append(run_projector(ctx, f"{short} reordered", store, mixed, reordered))
            results.runs.append(run_projector(ctx, f"{short} in-order", store, ordered, in_order))
        if "consumers" in parts:
            two_consumers = replace(ctx, consumers=2)
            name = f"{short} reordered, 2 consumers"
            results.runs.append(run_projector(two_consumers, name, store, mixed, reordered))
        if "two" in parts:
            run = run_projector(
                ctx, f"{short} two processes", store, published(reordered), reordered, 2
            )
            results.runs.append(run)
        if "parked" in parts and store == "postgres":
            # The bar's RSS is at 10k events parked: with replays asked for after projector's
            # default gap_timeout, every later event of a withheld event's stream waits.
            late = replace(ctx, gap_timeout=args.parked_gap_timeout)
            name = f"{short} reordered, replays after {args.parked_gap_timeout:g} s"
            results.runs.append(run_projector(late, name, store, mixed, reordered))
        if "baselines" in parts:
            found += _store_baselines(ctx, store, ordered, args)
        if "peer" in parts and store == "postgres":
            ctx.say(f"{store}: (d) the peer, Quix Streams, in order and reordered")
            found.append(quix_peer(topics, ordered, ctx.workload, "in order", ctx.out))
            found.append(quix_peer(topics, mixed, ctx.workload, "reordered", ctx.out))


def _store_baselines(
    ctx: Context, store: str, ordered: str, args: argparse.Namespace
) -> list[baselines.Baseline]:
    count = min(len(ctx.workload), args.baseline_events)
    naive = min(len(ctx.workload), args.naive_events)
    with resources(ctx.svc) as res:
        ctx.say(f"{store}: (b) store-only on {count:,} events")
        if store == "postgres":
            found = baselines.pg_store_only(res, ctx.workload, count, args.batch)
            ctx.say(f"{store}: (c) naive on {naive:,} events")
            found.append(baselines.pg_naive(res, ordered, naive))
        else:
            found = baselines.redis_store_only(res, ctx.workload, count, args.batch)
            ctx.say(f"{store}: (c) naive on {naive:,} events")
            found.append(baselines.redis_naive(res, ordered, naive))
        ctx.say(f"{store}: (e) the bare pipeline on the in-order topic, one process and two")
        found += bare_pipeline(res, store, ordered, ctx.workload)
    return found
