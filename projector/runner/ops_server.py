"""One HTTP port for operations: ``/metrics`` (Prometheus), ``/healthz`` (the poll loops are
alive; 503 when one has stalled) and ``/readyz`` (caught up and no gap too old; 503 with the
reason otherwise). prometheus-client's own server answers every path with the metrics, hence
this small router."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class OpsServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health: Check, ready: Check
    ):
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _check(health),
            "/readyz": lambda: _check(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would drown the log

        self._server = _bind(host, port, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on port %d", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    # Several instances on one host share a config: keep serving, on a port the OS picks, and
    # say so (in Kubernetes each pod has its own port space and this never happens).
    server = ThreadingHTTPServer((host, 0), handler)
    log.warning(
        "metrics.port %d is in use (another projector on this host?); serving /metrics,"
        " /healthz and /readyz on port %d instead: set metrics.port per instance",
        port,
        server.server_address[1],
    )
    return server


def _check(check: Check) -> tuple[int, str, bytes]:
    try:
        ok, reason = check()
    except Exception as exc:  # a check that cannot tell is a "no", with the reason
        ok, reason = False, f"check failed: {exc}"
    return (200 if ok else 503), "text/plain; charset=utf-8", (reason + "\n").encode()
