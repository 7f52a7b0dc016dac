"""CPU time on this machine (Linux ``/proc``), to show where a run's two cores went: the services
the run uses (found by the port they listen on, so another Kafka or PostgreSQL on the machine,
say a test suite's, is not counted as theirs) and the whole machine, whose remainder is work
that is none of the run's.

PostgreSQL forks a backend per connection and reaps it when it closes; the postmaster's
``cutime``/``cstime`` keep what its reaped children used, so the sum over the postmaster and its
children of (utime + stime + cutime + cstime), taken before and after, counts backends that came
and went in between.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

_TICK = os.sysconf("SC_CLK_TCK")


def ports(kafka: str, pg_dsn: str, redis_url: str) -> dict[str, int]:
    """The port each service listens on, from the connection settings."""
    return {
        "kafka": int(kafka.split(",", maxsplit=1)[0].rsplit(":", 1)[1]),
        "pg": urlsplit(pg_dsn).port or 5432,
        "redis": urlsplit(redis_url).port or 6379,
    }


def snapshot(service_ports: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per service, and of the whole machine (``machine``)."""
    stats = _stats()
    out = {"machine": _machine()}
    for name, port in service_ports.items():
        pid = _listener(port)
        if pid is None or pid not in stats:
            out[name] = 0.0
            continue
        family = [pid] + [p for p, (ppid, _cpu) in stats.items() if ppid == pid]
        out[name] = sum(stats[p][1] for p in family)
    return out


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


def _machine() -> float:
    """Non-idle CPU seconds of all cores since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _stats() -> dict[int, tuple[int, float]]:
    """Per process: parent pid, CPU seconds (its own and its reaped children's)."""
    out: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # stat(5): ppid is field 4, utime..cstime 14-17; here counted from field 3 (state).
        cpu = sum(int(v) for v in fields[11:15]) / _TICK
        out[int(stat.parent.name)] = (int(fields[1]), cpu)
    return out


def _listener(port: int) -> int | None:
    """The process listening on TCP ``port`` (IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) in inodes:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None
