"""The replay request: which events of which stream a projection is missing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from projector.core.gaps import Gap


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """Sent as JSON, keyed by stream: ``{projection, stream, from_seq, to_seq, attempt,
    requested_at}`` (``requested_at`` ISO-8601 UTC). The write side answers by re-publishing the
    events ``from_seq..to_seq`` of ``stream``; duplicates are harmless."""

    projection: str
    stream: str
    from_seq: int
    to_seq: int
    attempt: int
    requested_at: str

    @classmethod
    def for_gap(cls, projection: str, gap: Gap, now: float) -> ReplayRequest:
        when = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        return cls(projection, gap.stream, gap.from_seq, gap.to_seq, gap.attempts, when)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ReplayRequest:
        obj: dict[str, Any] = json.loads(raw)
        return cls(
            str(obj["projection"]),
            str(obj["stream"]),
            int(obj["from_seq"]),
            int(obj["to_seq"]),
            int(obj.get("attempt", 1)),
            str(obj.get("requested_at", "")),
        )
