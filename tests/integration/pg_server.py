"""A private PostgreSQL cluster for tests that restart or crash the server: ``initdb`` in a
directory of its own, ``pg_ctl`` on a free loopback port, restarted in any shutdown mode on the
same port and data (``immediate`` is a crash: the next start runs crash recovery), stopped and
removed at the end. Restarting it never disturbs the shared server other tests use.

As root, PostgreSQL runs as the ``postgres`` system user (it refuses root), in a directory under
the system temp dir that user can reach (pytest's ``tmp_path`` is private to root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.integration.redis_server import free_port

START_TIMEOUT = 120  # seconds; pg_ctl -w waits for the server to accept connections
HOST = "127.0.0.1"


def pg_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian layout, as dev/services.sh)."""
    found = sorted(
        (d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "postgres").exists()),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError("no PostgreSQL under /usr/lib/postgresql (run dev/services.sh up)")
    return found[-1]


def _as_root() -> bool:
    return os.geteuid() == 0


class PgServer:
    """One private cluster: ``start``, ``restart(mode)``, ``stop`` for good (``close``)."""

    def __init__(self, tmp_path: Path, *settings: str):
        self.bin = pg_bindir()
        if _as_root():
            self.root = Path(tempfile.mkdtemp(prefix="projector-pg-"))
            shutil.chown(self.root, "postgres")
        else:
            self.root = tmp_path / "pg"
            self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.settings = settings
        self.starts = 0
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "projector",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )

    def _pg(self, tool: str, *args: str, timeout: float = START_TIMEOUT + 30) -> None:
        command = [str(self.bin / tool), *args]
        if _as_root():
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr}{self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://projector@{HOST}:{self.port}/postgres"

    def dsn(self, dbname: str) -> str:
        return f"postgresql://projector@{HOST}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new database on this server; its DSN."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.dsn(name)

    def start(self) -> None:
        """Start on the same port and data directory; returns once it accepts connections."""
        options = [
            f"-p {self.port}",
            f"-c listen_addresses={HOST}",
            "-c unix_socket_directories=''",
            "-c max_connections=60",
            # A crash of the server process, not of the host: the kernel keeps what was
            # written, so skipping fsync loses nothing here and spares the shared disk.
            "-c fsync=off",
            *(f"-c {s}" for s in self.settings),
        ]
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-o",
            " ".join(options),
            "start",
        )
        self.starts += 1

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (``immediate``: every process quits at once, no checkpoint,
        as in a crash); returns once the postmaster is gone."""
        if (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "immediate") -> float:
        """Stop in ``mode`` and start again; the seconds it was down (stop begun to ready)."""
        began = time.monotonic()
        self.stop(mode)
        self.start()
        return time.monotonic() - began

    def close(self) -> None:
        """Stop for good and remove the cluster (whatever state it is in)."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
