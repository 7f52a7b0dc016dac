"""A private single-node Kafka broker (KRaft, broker and controller in one process) for tests
that kill or restart the broker: free loopback ports, its own data directory, the jars that
``dev/services.sh`` resolved with Maven (cached under ``~/.cache/projector-dev``), started again
on the same ports and data after a kill, and stopped at the end.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import ROOT
from tests.integration.redis_server import free_port

START_TIMEOUT = 180.0  # seconds: a JVM on a busy 2-core machine, and log recovery after a kill
HOST = "127.0.0.1"
POM = ROOT / "dev/kafka/pom.xml"


def kafka_libs() -> Path:
    """The jar directory ``dev/services.sh`` resolves (same cache key: the pom's hash)."""
    cache = os.environ.get("PROJECTOR_DEV_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "projector-dev"
    )
    key = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    libs = Path(cache) / f"kafka-{key}" / "libs"
    if not (libs / ".complete").exists():
        raise RuntimeError(f"no Kafka jars in {libs}: run dev/services.sh up first")
    return libs


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class KafkaServer:
    """``start`` (formats its storage the first time), ``kill`` (SIGKILL, a crash), ``start``
    again, ``close`` for good."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.classpath = f"{kafka_libs()}/*"
        self.data.mkdir(parents=True, exist_ok=True)
        self.properties = workdir / "server.properties"
        self.log4j = workdir / "log4j.properties"
        self.server_log = workdir / "server.log"
        self._configure()
        self._format()

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def _configure(self) -> None:
        self.properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{HOST}:{self.port},"
                    f"CONTROLLER://{HOST}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={self.data}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=2",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=2",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        self.log4j.write_text(
            "\n".join(
                [
                    "log4j.rootLogger=INFO, file",
                    "log4j.appender.file=org.apache.log4j.FileAppender",
                    f"log4j.appender.file.File={self.server_log}",
                    "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
                    "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
                    "",
                ]
            )
        )

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.log4j}",
            "-cp",
            self.classpath,
            *args,
        ]

    def _format(self) -> None:
        # A KRaft cluster id is 16 bytes in URL-safe base64 (22 characters).
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            self._java(
                "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties)
            ),
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {done.stdout}{done.stderr}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        """Start on the same ports and data; returns once it logged that it started and its
        port answers (polled: the JVM gives no other signal), with the seconds it took."""
        assert not self.running, "the broker is already running"
        began = time.monotonic()
        since = self.server_log.stat().st_size if self.server_log.exists() else 0
        with (self.workdir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = began + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.proc.returncode}: {self.tail()}")
            if self._logged_started(since) and _port_open(self.port):
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start in {START_TIMEOUT}s: {self.tail()}")
            time.sleep(0.05)

    def _logged_started(self, since: int) -> bool:
        if not self.server_log.exists():
            return False
        with self.server_log.open("rb") as f:
            f.seek(since)
            return b"Kafka Server started" in f.read()

    def tail(self, chars: int = 3000) -> str:
        text = self.server_log.read_text(errors="replace") if self.server_log.exists() else ""
        return text[-chars:]

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
