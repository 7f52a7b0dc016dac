"""Private redis-server processes for tests that need a server configured their own way, or one
they can kill: each on a free loopback port, in its own data directory, started (and started
again on the same port and directory, after a kill) with a deadline on PING, stopped at the end.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
AOF = ("--save", "", "--appendonly", "yes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisExited(RuntimeError):
    """The server exited while starting (a port taken meanwhile, a bad argument)."""


@dataclass
class RedisServer:
    """One redis-server: ``start`` it, ``kill`` it (SIGKILL, as a crash), ``start`` it again
    on the same port and directory (it reloads its AOF or snapshot; its script cache is
    empty), ``stop`` it for good (and close the clients it handed out)."""

    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    _clients: list[redis.Redis] = field(default_factory=list)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A client of this server (closed by ``stop``)."""
        client = redis.Redis.from_url(self.url, **{"socket_timeout": 5, **options})
        self._clients.append(client)
        return client

    def start(self) -> None:
        """Start the process and return once it answers PING; ``RedisExited`` if it exits
        first, ``RuntimeError`` if it does not answer within ``START_TIMEOUT``."""
        assert not self.running, "the server is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--logfile", str(self.log), *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        probe = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            self._wait_for_ping(self.proc, probe)
        finally:
            probe.close()

    def _wait_for_ping(self, proc: subprocess.Popen[bytes], probe: redis.Redis) -> None:
        """Poll PING until it answers, the process dies, or the deadline passes (no event to
        wait on: the server starts, and loads its data, asynchronously)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = self.log.read_text() if self.log.exists() else ""
                raise RedisExited(f"redis-server exited with {proc.returncode}: {text}")
            try:
                if probe.ping():
                    return
            except redis.AuthenticationError:
                raise
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed beyond what its fsync policy wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.kill()


class RedisServers:
    """Starts private servers under ``root`` and stops them all at ``close``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[RedisServer] = []

    def start(self, *args: str, password: str | None = None) -> RedisServer:
        """A running server with these extra arguments."""
        # The free port may be taken between the probe and the bind: then try another one.
        for _ in range(2):
            try:
                return self._launch(args, password)
            except RedisExited:
                pass
        return self._launch(args, password)

    def _launch(self, args: tuple[str, ...], password: str | None) -> RedisServer:
        port = free_port()
        server = RedisServer(port, self.root / f"redis-{port}", args, password)
        self.started.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop()
        self.started.clear()
