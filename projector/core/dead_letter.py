"""Dead letters: what could not be applied, with why and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from projector.core.event import Event
from projector.core.message import RawMessage


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """``kind`` is one of: decode, seq_jump, seq_below_first, conflict, handler; in merge
    mode also no_timestamp and merge (an event no merge takes); correlation_rule.
    Undecodable messages have only ``message``; the others have the decoded ``event``."""

    kind: str
    reason: str
    event: Event | None = None
    message: RawMessage | None = None

    @property
    def stream(self) -> str | None:
        return None if self.event is None else self.event.stream

    @property
    def seq(self) -> int | None:
        return None if self.event is None else self.event.seq

    @property
    def blocks_stream(self) -> bool:
        """A failed handler halts its stream; a rejected seq does not (the stream's next
        event may still come)."""
        return self.kind == "handler"
