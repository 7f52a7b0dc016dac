"""The store's own errors; adapters translate driver errors into these at their boundary."""

from __future__ import annotations


class StoreError(Exception):
    pass


class TransientStoreError(StoreError):
    """Retry the batch: a lost connection, a serialization failure, a deadlock."""


class StoreUnavailable(TransientStoreError):
    """The store cannot be reached right now."""


class Fenced(StoreError):
    """This instance's epoch for these partitions is no longer current: another instance owns
    them. The batch was rolled back and must not be committed to Kafka."""

    def __init__(self, partitions: list[tuple[str, int]]):
        self.partitions = partitions
        names = ", ".join(f"{t}[{p}]" for t, p in partitions)
        super().__init__(f"fenced: another instance owns {names}")


class SchemaBehind(StoreError):
    """The database schema is older than this version of projector."""
