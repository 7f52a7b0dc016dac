"""How long the poll loop waits before trying a batch again (projector.runner.worker)."""

from __future__ import annotations

import pytest
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from projector.runner.worker import retry_wait
from projector.store.errors import TransientStoreError, WriteConflict, is_transient


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
