"""The reference replay responder: the write side's half of gap replay, the pattern to copy.

It takes replay requests (JSON ``{projection, stream, from_seq, to_seq, attempt, requested_at}``)
from a Kafka topic or HTTP POSTs, reads the range from an event-store table in PostgreSQL
(``event_store(stream text, seq bigint, payload jsonb, primary key (stream, seq))``) and
re-publishes each stored payload as it is, keyed by stream, on a topic the projection consumes.
At least once: publish, flush, then commit the requests (or answer 202). A range the store lacks
is logged as missing, a malformed request is logged and skipped, an unreachable store means
"read it again" (Kafka) or 503 (HTTP). See docs/replay.md; ``projector replay-responder``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any

import psycopg
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from psycopg import sql
from psycopg.types.json import Jsonb

from projector.core.replay_request import ReplayRequest
from projector.source.kafka import client_logging
from projector.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]
SCHEMA, TABLE = "public", "event_store"
_DDL = "create table if not exists {} (stream text not null, seq bigint not null, payload jsonb not null, primary key (stream, seq))"
_SELECT = "select seq, payload::text from {} where stream = %s and seq between %s and %s order by 1"
_INSERT = "insert into {} (stream, seq, payload) values (%s, %s, %s) on conflict do nothing"


def create_event_store(conn: Conn, schema: str = SCHEMA, table: str = TABLE) -> None:
    """Create the event-store table (and its schema) unless they exist."""
    with conn.transaction():
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(_DDL).format(sql.Identifier(schema, table)))


def append_events(
    conn: Conn, wires: Iterable[Mapping[str, Any]], schema: str = SCHEMA, table: str = TABLE
) -> int:
    """Append wire events (dicts with ``stream`` and ``seq``) as they are; an event already
    stored at its (stream, seq) is kept. Returns how many were given."""
    rows = [(str(w["stream"]), int(w["seq"]), Jsonb(dict(w))) for w in wires]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(sql.SQL(_INSERT).format(sql.Identifier(schema, table)), rows)
    return len(rows)


def _next_offsets(batch: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to commit after ``batch``: per partition, the one after its last message."""
    after: dict[tuple[str, int], int] = {}
    for msg in batch:
        after[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
    return [TopicPartition(t, p, o) for (t, p), o in after.items()]


def parse_request(raw: bytes | None) -> ReplayRequest:
    """A request from its JSON; ``ValueError`` says what is wrong with a malformed one."""
    try:
        req = ReplayRequest.from_json(raw or b"")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed replay request ({type(exc).__name__}: {exc})") from None
    if req.from_seq > req.to_seq or not req.stream:
        raise ValueError(f"malformed replay request: empty stream or range in {req}")
    return req


def missing_ranges(lo: int, hi: int, have: Sequence[int]) -> list[tuple[int, int]]:
    """The parts of ``lo..hi`` not in ``have`` (sorted seqs within the range)."""
    bounds = [lo - 1, *have, hi + 1]
    return [(a + 1, b - 1) for a, b in pairwise(bounds) if b - a > 1]


@dataclass(frozen=True)
class Served:
    request: ReplayRequest
    published: int
    missing: list[tuple[int, int]]


class ReplayResponder:
    """Serves replay requests from the table ``schema.table`` onto ``target_topic``: consumed
    from ``requests_topic`` in consumer group ``group`` (``run``), or handed to ``serve``."""

    def __init__(
        self,
        bootstrap: str,
        dsn: str,
        target_topic: str,
        *,
        requests_topic: str | None = None,
        group: str = "projector-replay-responder",
        schema: str = SCHEMA,
        table: str = TABLE,
    ):
        self.target_topic, self._dsn = target_topic, dsn
        self._select = sql.SQL(_SELECT).format(sql.Identifier(schema, table))
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, **client_logging()}
        )
        self._consumer: Consumer | None = None
        self.last_activity = time.monotonic()
        if requests_topic:
            conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group}
            conf |= client_logging()
            conf |= {"enable.auto.commit": False, "auto.offset.reset": "earliest"}
            self._consumer = Consumer(conf)
            self._consumer.subscribe([requests_topic], on_assign=lambda *_: self._touch())

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle(self, idle_exit: float | None) -> bool:
        return idle_exit is not None and time.monotonic() - self.last_activity >= idle_exit

    def _read(self, req: ReplayRequest) -> list[tuple[int, str]]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
                rows = self._conn.execute(self._select, (req.stream, req.from_seq, req.to_seq))
                return [(int(r[0]), str(r[1])) for r in rows.fetchall()]
            except psycopg.Error as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise StoreUnavailable(f"cannot read the event store: {exc}") from exc

    def serve(self, req: ReplayRequest) -> Served:
        """Publish the stored events of the request's range; return once Kafka has them all."""
        published = self._publish(req)
        self._flush([published])
        return published[0]

    def _publish(self, req: ReplayRequest) -> tuple[Served, list[KafkaError | None]]:
        """Hand the range's stored events to the producer, unflushed; the list fills with one
        delivery report per message (None when delivered)."""
        stored = self._read(req)
        errors: list[KafkaError | None] = []
        for _seq, payload in stored:
            if len(self._producer) >= 50_000:  # keep the local queue short of its bound
                self._producer.flush(30)
            self._producer.produce(
                self.target_topic, payload, req.stream, on_delivery=lambda e, _: errors.append(e)
            )
        missing = missing_ranges(req.from_seq, req.to_seq, [s for s, _ in stored])
        if missing:
            log.warning("%s: the event store has no %s of %s", req.projection, missing, req.stream)
        return Served(req, len(stored), missing), errors

    def _flush(self, published: Sequence[tuple[Served, list[KafkaError | None]]]) -> None:
        """Wait until Kafka has every message handed over; raise naming a request that it
        does not have."""
        timed_out = self._producer.flush(30) > 0
        for served, errors in published:
            req = served.request
            if timed_out or any(errors):
                failed = [e for e in errors if e] or "timeout"
                raise KafkaException(f"replay of {req.stream} not published: {failed}")
        for served, _ in published:
            req = served.request
            log.info("%s: replayed %d event(s) of %s", req.projection, served.published, req.stream)

    def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """HTTP: 202 once published, 400 if malformed, 503 if it cannot be served now."""
        self._touch()
        try:
            served = self.serve(parse_request(body))
        except (ValueError, StoreUnavailable, KafkaException) as exc:
            log.warning("%s", exc)
            return (400 if isinstance(exc, ValueError) else 503), {"error": str(exc)}
        return 202, {"published": served.published, "missing": served.missing}

    def serve_one_batch(self, timeout: float = 1.0, max_requests: int = 100) -> list[Served]:
        """Serve the requests waiting (up to ``max_requests``; the first may take ``timeout``
        to come): their events are published and flushed together, then the requests are
        committed together. On a store or Kafka failure nothing of the batch is committed: it
        is rewound to, read again and served again (duplicates are harmless), and raised."""
        assert self._consumer is not None, "this responder has no requests topic"
        batch = self._take(timeout, max_requests)
        if not batch:
            return []
        self._touch()
        published: list[tuple[Served, list[KafkaError | None]]] = []
        try:
            for msg in batch:
                try:
                    req = parse_request(msg.value())
                except ValueError as exc:
                    log.warning(
                        "skip %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), exc
                    )
                    continue
                published.append(self._publish(req))
            self._flush(published)
        except (StoreUnavailable, KafkaException):
            self._rewind(batch)
            raise
        # One commit for the batch: a commit per request cost the broker more than serving it.
        self._consumer.commit(offsets=_next_offsets(batch), asynchronous=False)
        return [served for served, _ in published]

    def _take(self, timeout: float, max_requests: int) -> list[Message]:
        """The first request within ``timeout``, then those already fetched behind it."""
        assert self._consumer is not None
        batch: list[Message] = []
        wait = timeout
        while len(batch) < max_requests and (msg := self._consumer.poll(wait)) is not None:
            wait = 0
            if msg.error():
                log.warning("Kafka: %s", msg.error())
                continue
            batch.append(msg)
        return batch

    def _rewind(self, batch: Sequence[Message]) -> None:
        """Seek each partition of ``batch`` back to its first request in it."""
        assert self._consumer is not None
        first: dict[tuple[str, int], int] = {}
        for msg in batch:
            first.setdefault((msg.topic() or "", msg.partition() or 0), msg.offset() or 0)
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> None:
        """Serve requests until ``stop`` is set, or ``idle_exit`` seconds pass without one."""
        while not stop.is_set() and not self.idle(idle_exit):
            try:
                self.serve_one_batch(timeout=0.5)
            except (StoreUnavailable, KafkaException) as exc:
                log.warning("%s; serving the batch again shortly", exc)
                stop.wait(1.0)

    def close(self) -> None:
        if self._consumer:
            self._consumer.close()
        self._producer.flush(10)
        if self._conn is not None:
            self._conn.close()


def serve_http(
    responder: ReplayResponder,
    address: tuple[str, int],
    stop: threading.Event,
    idle_exit: float | None = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Answer requests POSTed to ``address`` (port 0: a free one, told to ``on_ready``) until
    ``stop`` is set or ``idle_exit`` seconds pass without a request."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"] or 0))
            code, answer = responder.answer(body)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    with ThreadingHTTPServer(address, Handler) as server:
        server.timeout = 0.2
        bound = (str(server.server_address[0]), int(server.server_address[1]))
        log.info("serving replay requests on http://%s:%d/", *bound)
        if on_ready is not None:
            on_ready(bound)
        while not stop.is_set() and not responder.idle(idle_exit):
            server.handle_request()


def respond(responder: ReplayResponder, http: str | None, idle_exit: float | None) -> None:
    """Serve by HTTP on ``HOST:PORT`` if given, else from Kafka, until SIGTERM/SIGINT."""
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    try:
        if http is None:
            return responder.run(stop, idle_exit)
        host, _, port = http.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--http {http!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
        serve_http(responder, (host, int(port)), stop, idle_exit)
    except OSError as exc:
        raise ValueError(f"cannot serve HTTP on {http}: {exc.strerror or exc}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        responder.close()
