"""How long the poll loop waits before trying a batch again (projector.runner.worker), and
which Redis errors count as a write conflict."""

from __future__ import annotations

import pytest
import redis
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from projector.runner.worker import retry_wait
from projector.store.errors import TransientStoreError, WriteConflict, is_transient
from projector.store.redis import _connection_lost


def waits_before_success(failures: list[Exception]) -> list[float]:
    """The sleeps the worker's wait policy asks for while ``failures`` are raised in turn."""
    sleeps: list[float] = []
    pending = list(failures)

    def attempt() -> str:
        if pending:
            raise pending.pop(0)
        return "applied"

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=retry_wait,
        stop=stop_after_attempt(len(failures) + 1),
        sleep=sleeps.append,
        reraise=True,
    )
    assert retrying(attempt) == "applied"
    return sleeps


def test_a_write_conflict_is_planned_again_at_once_however_often_it_repeats() -> None:
    """Proves a batch that keeps losing Redis's optimistic check is not pushed back further
    each time (with backoff, one waited 36 s while the other writer went on): every retry
    comes within 10 ms."""
    sleeps = waits_before_success([WriteConflict("another writer")] * 20)
    assert len(sleeps) == 20
    assert all(0.0 <= s <= 0.01 for s in sleeps)


def test_other_transient_errors_back_off_exponentially() -> None:
    """Proves a store in trouble (a lost connection, a deadlock) is given growing pauses."""
    sleeps = waits_before_success([TransientStoreError("connection lost")] * 4)
    assert sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4])


def test_a_connection_lost_at_the_commit_is_not_taken_for_a_write_conflict() -> None:
    """Proves the Redis store tells redis-py's two WatchErrors apart: the one it raises for a
    connection lost while keys are watched (then the store reconnects, with backoff, and the
    outcome of the commit is read back), and a real conflict (plan again at once)."""
    try:
        try:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        except redis.exceptions.ConnectionError as error:
            raise redis.exceptions.WatchError(
                f"A {type(error).__name__} occurred while watching one or more keys"
            ) from None
    except redis.exceptions.WatchError as lost:
        assert _connection_lost(lost)
    assert not _connection_lost(redis.exceptions.WatchError("Watched variable changed."))
