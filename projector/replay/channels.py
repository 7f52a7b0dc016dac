"""Replay request channels: a Kafka topic or an HTTP endpoint. A channel sends a list of
requests and reports how many were delivered and how many failed; it never raises for a failed
request (the gap's schedule asks again later)."""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer

from projector.config import ReplayConfig
from projector.core.replay_request import ReplayRequest
from projector.source.kafka import client_logging

log = logging.getLogger(__name__)


# A send's outcome: (delivered, failed). Called once per send, maybe later, from another thread.
Outcome = Callable[[int, int], None]


class ReplayChannel(Protocol):
    def send(self, requests: Sequence[ReplayRequest], outcome: Outcome) -> None:
        """Send; ``outcome`` gets the counts once known. Returns within about the channel's
        timeout, whatever the number of requests and however the other side behaves."""

    def close(self) -> None: ...


class KafkaChannel:
    def __init__(self, bootstrap: str, topic: str, extra: Mapping[str, Any], timeout: float):
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "message.timeout.ms": max(1000, int(timeout * 1000)),
            **client_logging(),
            **extra,
        }
        self._producer = Producer(conf)
        self._topic = topic
        self._timeout = timeout

    def send(self, requests: Sequence[ReplayRequest], outcome: Outcome) -> None:
        failed: list[ReplayRequest] = []
        for req in requests:

            def report(err: KafkaError | None, _msg: Message, req: ReplayRequest = req) -> None:
                if err is not None:
                    log.warning(
                        "replay request for %s %d-%d failed: %s",
                        req.stream,
                        req.from_seq,
                        req.to_seq,
                        err,
                    )
                    failed.append(req)

            self._producer.produce(
                self._topic, value=req.to_json(), key=req.stream.encode(), on_delivery=report
            )
        if self._producer.flush(self._timeout + 1) > 0:
            log.warning("replay requests not delivered within %.1fs", self._timeout)
            outcome(0, len(requests))
            return
        outcome(len(requests) - len(failed), len(failed))

    def close(self) -> None:
        self._producer.flush(self._timeout)


class HttpChannel:
    """POSTs each request from a few threads of its own, so an endpoint that is slow or never
    answers holds up no poll loop: in the loop, up to 500 due gaps a check at ``timeout`` each
    would stall it for minutes. At most ``max_waiting`` requests wait for a thread; past that,
    new ones fail at once (logged), and their gaps ask again on their schedule."""

    def __init__(self, url: str, timeout: float, threads: int = 4, max_waiting: int = 1000):
        self._url = url
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="replay-http")
        self._max_waiting = max_waiting
        self._waiting = 0
        self._lock = threading.Lock()

    def send(self, requests: Sequence[ReplayRequest], outcome: Outcome) -> None:
        with self._lock:
            taken = list(requests[: max(0, self._max_waiting - self._waiting)])
            self._waiting += len(taken)
        refused = len(requests) - len(taken)
        if refused:
            log.warning(
                "%d replay request(s) not sent: %d already wait for %s",
                refused,
                self._max_waiting,
                self._url,
            )
        tally = _Tally(len(taken), refused, outcome)
        for req in taken:
            self._pool.submit(self._post_counted, req, tally)

    def _post_counted(self, req: ReplayRequest, tally: _Tally) -> None:
        ok = self._post(req)
        with self._lock:
            self._waiting -= 1
        tally.add(ok)

    def _post(self, req: ReplayRequest) -> bool:
        request = urllib.request.Request(
            self._url,
            data=req.to_json(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return 200 <= int(response.status) < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning(
                "replay request for %s %d-%d failed: %s", req.stream, req.from_seq, req.to_seq, exc
            )
            return False

    def close(self) -> None:
        # Requests not yet posted are dropped (their gaps ask again after a restart); those
        # being posted end within the timeout.
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Tally:
    """Counts one send's requests as their POSTs end, and reports once the last has."""

    def __init__(self, pending: int, failed: int, outcome: Outcome):
        self._pending, self._delivered, self._failed = pending, 0, failed
        self._outcome = outcome
        self._lock = threading.Lock()
        if pending == 0:
            outcome(0, failed)

    def add(self, ok: bool) -> None:
        with self._lock:
            self._pending -= 1
            self._delivered += ok
            self._failed += not ok
            done = self._pending == 0
        if done:
            self._outcome(self._delivered, self._failed)


def open_channel(
    config: ReplayConfig, bootstrap: str, producer_extra: Mapping[str, Any]
) -> ReplayChannel | None:
    if config.channel == "kafka":
        assert config.topic is not None
        return KafkaChannel(bootstrap, config.topic, producer_extra, config.timeout)
    if config.channel == "http":
        assert config.url is not None
        return HttpChannel(config.url, config.timeout)
    return None
