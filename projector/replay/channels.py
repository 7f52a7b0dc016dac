"""Replay request channels: a Kafka topic or an HTTP endpoint. A channel sends a list of
requests and says which failed; it never raises for a failed request (the gap's schedule asks
again later)."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer

from projector.config import ReplayConfig
from projector.core.replay_request import ReplayRequest
from projector.source.kafka import client_logging

log = logging.getLogger(__name__)


class ReplayChannel(Protocol):
    def send(self, requests: Sequence[ReplayRequest]) -> list[ReplayRequest]:
        """Send; return the requests that failed."""

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

    def send(self, requests: Sequence[ReplayRequest]) -> list[ReplayRequest]:
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
            return list(requests)
        return failed

    def close(self) -> None:
        self._producer.flush(self._timeout)


class HttpChannel:
    def __init__(self, url: str, timeout: float):
        self._url = url
        self._timeout = timeout

    def send(self, requests: Sequence[ReplayRequest]) -> list[ReplayRequest]:
        return [req for req in requests if not self._post(req)]

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
        return None


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
