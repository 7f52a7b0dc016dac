"""``python -m bench.responder``: the reference replay responder serving a pile of waiting
requests one at a time (a flush and a synchronous commit each: ``max_requests=1``) and
together (``serve_one_batch``'s default), side by side in one run, with the wall time and the
Kafka broker's CPU of each. The reordered bench run sends ~1,000 requests in a burst once
its first gaps fall due; the broker's CPU is what they take from the daemon on this machine.

    .venv/bin/python -m bench.responder [--requests 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import psycopg

from bench.cpu import ports, snapshot
from bench.services import Resources, producer, resources, services, unique
from projector.core.replay_request import ReplayRequest
from projector.replay.responder import ReplayResponder, append_events, create_event_store

MAX_REQUESTS = 100  # serve_one_batch's default


def serve_all(res: Resources, dsn: str, requests: int, max_requests: int) -> tuple[float, float]:
    """Publish ``requests`` requests, then serve them all with a fresh responder; wall
    seconds and the broker's CPU seconds of the serving."""
    svc = res.svc
    requests_topic, target = res.topic(1), res.topic(4)
    p = producer(svc.kafka)
    for i in range(requests):
        req = ReplayRequest("accounts", f"account:{i}", 1, 1, 1, "2026-01-01T00:00:00Z")
        p.produce(requests_topic, req.to_json(), f"account:{i}".encode())
    p.flush(30)
    responder = ReplayResponder(
        svc.kafka, dsn, target, requests_topic=requests_topic, group=res.group(unique("resp"))
    )
    try:
        # The group's first assignment takes seconds: it is not what is measured.
        first = responder.serve_one_batch(timeout=30, max_requests=1)
        served = len(first)
        service_ports = ports(svc.kafka, svc.pg_dsn, svc.redis_url)
        before, started = snapshot(service_ports)["kafka"], time.perf_counter()
        deadline = started + 120
        while served < requests:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{requests - served} of {requests} requests not served")
            served += len(responder.serve_one_batch(timeout=5, max_requests=max_requests))
        wall = time.perf_counter() - started
        return wall, snapshot(service_ports)["kafka"] - before
    finally:
        responder.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.responder", description=__doc__)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2, help="alternating pairs (a noisy machine)")
    args = p.parse_args(argv)
    svc = services()
    with resources(svc) as res:
        dsn = res.database()
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_event_store(conn)
            events = [{"stream": f"account:{i}", "seq": 1} for i in range(args.requests)]
            append_events(conn, events)
        for round_ in range(1, args.rounds + 1):
            one = serve_all(res, dsn, args.requests, 1)
            batched = serve_all(res, dsn, args.requests, MAX_REQUESTS)
            print(
                f"round {round_}: {args.requests - 1:,} requests one at a time {one[0]:.2f} s"
                f" (Kafka CPU {one[1]:.2f} s), together {batched[0]:.2f} s"
                f" (Kafka CPU {batched[1]:.2f} s): {one[0] / batched[0]:.1f}x the time,"
                f" {one[1] / max(batched[1], 0.01):.1f}x the broker's CPU"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
