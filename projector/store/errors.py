"""The store's own errors; adapters translate driver errors into these at their boundary."""

from __future__ import annotations

import psycopg
import redis
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential


class StoreError(Exception):
    pass


class TransientStoreError(StoreError):
    """Retry the batch: a lost connection, a serialization failure, a deadlock."""


class WriteConflict(TransientStoreError):
    """Another writer changed what the batch read (Redis's optimistic check): plan it again at
    once. Not a sign of trouble with the store, so no backoff and no new connection: waiting
    only lets the other writer, which may be writing those streams on and on, win again."""


class StoreUnavailable(TransientStoreError):
    """The store cannot be reached right now."""


class Fenced(StoreError):
    """This instance's epoch for these partitions is no longer current: another instance owns
    them. The batch was rolled back and must not be committed to Kafka."""

    def __init__(self, partitions: list[tuple[str, int]]):
        self.partitions = partitions
        names = ", ".join(f"{t}[{p}]" for t, p in partitions)
        super().__init__(f"fenced: another instance owns {names}")


class NotPrepared(StoreError):
    """A batch built behind one whose commit was in flight (``Store.plans_ahead``) failed
    before it was prepared: its own error, or the one ahead's, which the store keeps for
    ``wait_commit``. It was rolled back. Land the batch in flight, then apply this one as
    usual, where its own error shows again and is dealt with (a dead letter, a fence)."""


class SchemaBehind(StoreError):
    """The database schema is older than this version of projector."""


_PG_TRANSIENT = (
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
)
# Lost connection, timeout, a server still loading its AOF, a script running too long, a
# replica gone read-only in a failover: all pass. A NOSCRIPT is healed by the store itself.
_REDIS_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.WatchError,
    redis.exceptions.NoScriptError,  # flushed again between the reload and its retry
)
_REDIS_TRANSIENT_REPLIES = ("BUSY ", "OOM ", "LOADING ", "TRYAGAIN ", "MASTERDOWN ")


def is_transient(exc: BaseException) -> bool:
    """Errors that mean "try the batch again", not "this event is bad"."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return False  # a wrong password stays wrong
    if isinstance(exc, (TransientStoreError, *_PG_TRANSIENT, *_REDIS_TRANSIENT)):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        _REDIS_TRANSIENT_REPLIES
    )


def transient_retries(attempts: int = 10) -> Retrying:
    """For one-off store work outside the poll loop (a command, a gap skip): try again on a
    transient error, briefly, then give up with it."""
    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.05, max=2),
        stop=stop_after_attempt(attempts),
        reraise=True,
    )
