"""``handlers.game_redis`` behind the test gate (see ``tests/integration/gate.py``)."""

from __future__ import annotations

from collections.abc import Sequence

from handlers import game_redis
from projector.core.event import Event
from projector.store.redis_view import RedisView
from tests.integration import gate


def handle(events: Sequence[Event], view: RedisView) -> None:
    gate.pass_through(len(events))
    game_redis.handle(events, view)
