"""A TCP proxy between a client (the daemon) and PostgreSQL or Redis that can cut a connection
at the worst moment: after the client's commit reached the server and before the server's
answer reaches the client. Armed (``arm()``), the next client packet that contains the commit
(PostgreSQL: the bytes ``COMMIT``, a simple query or a Parse inside a pipeline; Redis: an
``EXEC``, sent by redis-py with its MULTI and queued commands) is forwarded to the server; the
proxy then reads the server's answer itself (PostgreSQL: up to the COMMIT's CommandComplete or
an error; Redis: up to the EXEC's reply), still passing on what the client sends meanwhile (a
pipelining client asks for the answer in a message of its own), drops the answer, and closes
both sockets. The server has
committed (or not: the cut records what it answered); the client only sees its connection
close, so the outcome is unknown to it.

With ``marker``, only a commit that ends a transaction whose commands carried those bytes is
cut (say, a topic name: a batch's checkpoint update carries it as a parameter, the daemon's
other transactions don't), so the cut hits the transaction the test means.

Each connection is served by one thread that moves bytes both ways (``select`` on the two
sockets); ``close`` stops them all and closes every socket.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

REPLY_TIMEOUT = 30.0  # seconds to wait for the server's answer to an intercepted commit
COMMIT = {"postgres": b"COMMIT", "redis": b"$4\r\nEXEC\r\n"}


@dataclass(frozen=True)
class Cut:
    """One connection cut after a commit: when, and what the server answered (PostgreSQL
    ``COMMIT``: it committed, ``ROLLBACK``: the transaction had failed; Redis ``EXEC``: it
    ran the transaction, ``aborted``: a WATCHed key had changed; or ``error``, ``no answer``)."""

    at: float
    outcome: str


Recv = Callable[[float], bytes]  # the server's next bytes, before a deadline (b"": none)


def _answer_reader(server: socket.socket, client: socket.socket) -> Recv:
    """Reads the server's answer while the client's next messages still reach the server (a
    pipelining client asks for the answer in a message of its own after the commit): only
    what the server sends is lost."""

    def recv(deadline: float) -> bytes:
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(client, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.05, deadline - time.monotonic())):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if sock is server:
                        return data
                    if data:
                        server.sendall(data)
                    else:
                        selector.unregister(client)  # the client hung up; wait on the server
        return b""

    return recv


def _redis_outcome(recv: Recv) -> str:
    """Read RESP replies (MULTI's +OK, each +QUEUED) up to the EXEC's: an array (it ran),
    a null array (aborted: a WATCHed key changed) or an error."""
    buf = b""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < deadline:
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if line in (b"*-1", b"_"):
                return "aborted"
            if line.startswith(b"*"):
                return "EXEC"
            if line.startswith(b"-"):
                return "error"
        chunk = recv(deadline)
        if not chunk:
            return "no answer"
        buf += chunk
    return "no answer"


def _postgres_outcome(recv: Recv) -> str:
    """Read backend messages until the COMMIT's CommandComplete or an ErrorResponse (or the
    deadline); the tag of the first COMMIT/ROLLBACK completion, ``error`` or ``no answer``."""
    buf = b""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < deadline:
        while len(buf) >= 5:
            kind = buf[:1]
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                break
            body, buf = buf[5 : 1 + length], buf[1 + length :]
            if kind == b"C":
                tag = body.rstrip(b"\x00").decode(errors="replace")
                if tag in ("COMMIT", "ROLLBACK"):
                    return tag
            elif kind == b"E":
                return "error"
        chunk = recv(deadline)
        if not chunk:
            return "no answer"
        buf += chunk
    return "no answer"


class TcpProxy:
    """Listens on a free loopback port (``port``) and forwards to ``upstream``, a server of
    ``protocol`` (``postgres`` or ``redis``)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        marker: bytes | None = None,
        protocol: str = "postgres",
    ):
        self.upstream = (upstream_host, upstream_port)
        self.marker = marker
        self.commit = COMMIT[protocol]
        self._outcome = _postgres_outcome if protocol == "postgres" else _redis_outcome
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed = 0
        self._closing = threading.Event()
        self.cuts: list[Cut] = []
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="tcp-proxy-accept")
        self._acceptor.start()

    def arm(self, times: int = 1) -> None:
        """Cut the next ``times`` connections that send a commit, at their commit."""
        with self._lock:
            self._armed += times

    @property
    def armed(self) -> int:
        with self._lock:
            return self._armed

    def _take_arm(self) -> bool:
        with self._lock:
            if self._armed <= 0:
                return False
            self._armed -= 1
            return True

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), name="tcp-proxy-conn")
            with self._lock:
                self.connections += 1
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()  # upstream down: the client sees its connection refused-like close
            return
        with client, server, selectors.DefaultSelector() as selector:
            client.setblocking(True)
            server.settimeout(None)
            selector.register(client, selectors.EVENT_READ, server)
            selector.register(server, selectors.EVENT_READ, client)
            marked = False  # the marker went by since this connection's last COMMIT
            while not self._closing.is_set():
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    target: socket.socket = key.data
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is client:
                        marked = marked or self.marker is None or self.marker in data
                        if self.commit in data:
                            if marked and self._take_arm():
                                self._cut(server, client, data)
                                return
                            marked = (
                                self.marker is not None
                                and self.marker in data.split(self.commit)[-1]
                            )
                    try:
                        target.sendall(data)
                    except OSError:
                        return

    def _cut(self, server: socket.socket, client: socket.socket, data: bytes) -> None:
        """Forward the commit, swallow the answer; the caller closes both sockets."""
        try:
            server.sendall(data)
            outcome = self._outcome(_answer_reader(server, client))
        except OSError:
            outcome = "no answer"
        with self._lock:
            self.cuts.append(Cut(time.monotonic(), outcome))

    def close(self) -> None:
        self._closing.set()
        self._acceptor.join(10)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)
