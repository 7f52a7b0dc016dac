"""The HTTP replay channel against a local endpoint: what it reports, and what it refuses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from projector.core.replay_request import ReplayRequest
from projector.replay.channels import HttpChannel

pytestmark = pytest.mark.integration


def request(stream: str) -> ReplayRequest:
    return ReplayRequest("accounts", stream, 2, 3, 1, "2026-11-28T00:00:00Z")


class Outcomes:
    """What the channel reported, and a way to wait for it without sleeping."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self._done = threading.Condition()

    def __call__(self, delivered: int, failed: int) -> None:
        with self._done:
            self.seen.append((delivered, failed))
            self._done.notify_all()

    def wait(self, count: int) -> list[tuple[int, int]]:
        with self._done:
            assert self._done.wait_for(lambda: len(self.seen) >= count, 30), self.seen
            return list(self.seen)


@contextmanager
def endpoint(release: threading.Event) -> Iterator[tuple[str, list[str]]]:
    """A write side that answers 202, or 500 for streams named ``bad:...``, once ``release``
    is set; yields its URL and the streams it was asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            stream = json.loads(body)["stream"]
            asked.append(stream)
            release.wait(30)
            self.send_response(500 if stream.startswith("bad:") else 202)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/replay", asked
    finally:
        release.set()
        server.shutdown()
        thread.join(10)
        server.server_close()


def test_a_send_returns_at_once_and_reports_its_outcome_when_the_posts_end() -> None:
    """Proves the HTTP channel hands its POSTs to its own threads: ``send`` returns while the
    endpoint still holds every request, and once it answers, the send's outcome comes once,
    counting each 2xx as delivered and anything else as failed."""
    release = threading.Event()
    outcomes = Outcomes()
    with endpoint(release) as (url, asked):
        channel = HttpChannel(url, timeout=30)
        channel.send([request("a:1"), request("bad:2"), request("a:3")], outcomes)
        assert outcomes.seen == []  # nothing answered yet, and send has returned
        release.set()
        assert outcomes.wait(1) == [(2, 1)]
        channel.close()
    assert sorted(asked) == ["a:1", "a:3", "bad:2"]


def test_past_max_waiting_new_requests_fail_at_once() -> None:
    """Proves the bound on what waits: with two threads and room for three requests, a send of
    five takes three and fails two at once (their gaps ask again on their schedule); the three
    are delivered when the endpoint answers."""
    release = threading.Event()
    outcomes = Outcomes()
    with endpoint(release) as (url, _asked):
        channel = HttpChannel(url, timeout=30, threads=2, max_waiting=3)
        channel.send([request(f"a:{n}") for n in range(5)], outcomes)
        release.set()
        assert outcomes.wait(1) == [(3, 2)]
        channel.close()
