"""Redis side of the outbox (docs/correlation.md, sections 6 to 8; the keys in docs/redis.md):
the business events a batch queues in its script, and the publisher's reads and writes on a
client of its own.

Keys of a live projection, under ``<prefix>:s:<name>:``, not versioned (publishing is not
rebuilt):

- ``outbox``: a stream, the queue: entry ``<n>-0`` per business event still to publish (``n``
  from ``outbox:seq``: the publishing order, the ``seq`` of :class:`OutboxRow`), fields ``id
  topic key event at`` (``at``: Redis's clock when queued, ms, for the oldest-pending gauge);
- ``outbox:ids``: sorted set, event id -> ``+inf`` while pending, then the time (epoch s, the
  publisher's clock) it was published: a business event already there is not queued again;
  the sweep forgets published ids after the retention;
- ``outbox:seq``: string, the last ``n``; ``outbox:lock``: string, the publisher's lease.

A rebuild's held events, at the version it builds (``<prefix>:s:<name>:<version>:``, deleted
with that version when a rebuild starts again or is abandoned): ``cohold`` (hash, event id ->
``"<n> <message JSON>"``), ``coholdts`` (sorted set, event id -> event time, ms: the pruning
index and the de-duplication) and ``coholdseq`` (string, the last ``n``).

In a batch, projector's own commands ``OUTBOX``, ``OUTHOLD`` and ``OUTPRUNE`` (see
``lua/batch.lua``) do the writes after the fence and type checks. The publisher
(:class:`RedisOutbox`) holds a lease (``SET NX PX``, renewed by each round's read, released on
close, taken over once it expires); it reads pending entries in queue order, deletes the
delivered ones from the queue (their ids stay, with the time they were published) and sweeps
published ids after the retention.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from projector.core import json_codec
from projector.store.base import OutboxMessage, OutboxRow
from projector.store.errors import StoreUnavailable, TransientStoreError

if TYPE_CHECKING:  # redis.py delegates its batch's outbox commands here
    from projector.store.redis import RedisStore

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0  # a publisher that stops renewing is taken over this long after
SWEEP_CHUNK = 1000  # ids removed per command (Lua's unpack() has a stack limit)

Op = list[str]


@dataclass(frozen=True, slots=True)
class OutboxKeys:
    """A live projection's outbox keys (see the module docstring)."""

    queue: str
    ids: str
    seq: str
    lock: str

    @classmethod
    def of(cls, prefix: str, projection: str) -> OutboxKeys:
        live = f"{prefix}:s:{projection}:outbox"
        return cls(live, f"{live}:ids", f"{live}:seq", f"{live}:lock")


@dataclass(frozen=True, slots=True)
class HeldKeys:
    """A rebuild's held business events, at the version it builds (``base``: its
    ``<prefix>:s:<name>:<version>``)."""

    hold: str
    ts: str
    seq: str

    @classmethod
    def of(cls, base: str) -> HeldKeys:
        return cls(f"{base}:cohold", f"{base}:coholdts", f"{base}:coholdseq")


def _dumps(value: Any) -> str:
    return json_codec.dumps(value).decode()


def queue_op(keys: OutboxKeys, m: OutboxMessage) -> Op:
    """``OUTBOX``: queue one business event unless its id is in ``outbox:ids``."""
    return ["OUTBOX", keys.ids, keys.queue, keys.seq, m.event.id, m.topic, m.key, message_json(m)]


def hold_op(keys: HeldKeys, m: OutboxMessage) -> Op:
    """``OUTHOLD``: hold one business event aside (a rebuild's) unless held already."""
    ts = m.event.ts if m.event.ts is not None else 0
    return ["OUTHOLD", keys.hold, keys.ts, keys.seq, m.event.id, str(int(ts)), held_json(m)]


def prune_op(keys: HeldKeys, before_ts: int) -> Op:
    """``OUTPRUNE``: forget the held events older than ``before_ts`` (event time, ms)."""
    return ["OUTPRUNE", keys.hold, keys.ts, str(int(before_ts))]


def message_json(m: OutboxMessage) -> str:
    return _dumps(m.event.to_json())


def held_json(m: OutboxMessage) -> str:
    return _dumps({"topic": m.topic, "key": m.key, "event": m.event.to_json()})


def batch_ops(
    prefix: str,
    projection: str,
    base: str,
    messages: Sequence[OutboxMessage],
    held: bool,
    prune_held_before: int | None,
) -> list[Op]:
    """A batch's outbox commands: a rebuild's batch (``held``) prunes, then holds its events
    at the version it builds (``base``); a live batch queues them under ``projection``."""
    if not held:
        keys = OutboxKeys.of(prefix, projection)
        return [queue_op(keys, m) for m in messages]
    hk = HeldKeys.of(base)
    ops = [] if prune_held_before is None else [prune_op(hk, prune_held_before)]
    return ops + [hold_op(hk, m) for m in messages]


def parse_held(raw: str) -> tuple[int, dict[str, Any]]:
    """A ``cohold`` value: its order and the message (``topic``, ``key``, ``event``)."""
    n, _, body = raw.partition(" ")
    message: dict[str, Any] = json_codec.loads(body)
    return int(n), message


def owed(record: str | None) -> bool:
    """Whether the live run still owes a held business event of a key whose live correlation
    record is ``record`` (JSON; ``None``: no record): PostgreSQL's rule (docs/correlation.md,
    "Slice 5 as built"): not owed only when the live run closed a window of the key and has
    nothing open (no parts, no END record waiting)."""
    if record is None:
        return True
    r: Mapping[str, Any] = json_codec.loads(record)
    return bool(r.get("parts")) or r.get("end") is not None or not r.get("closed")


def correlation_keys(held: Mapping[str, str]) -> list[str]:
    """The correlation keys (``meta.key``) of held events, sorted, each once."""
    return sorted({_key_of(parse_held(raw)[1]) for raw in held.values()})


def _key_of(message: Mapping[str, Any]) -> str:
    return str(message["event"].get("meta", {}).get("key"))


def held_in_order(held: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """``cohold``'s entries (event id -> value) in the order they were named."""
    parsed = [(parse_held(raw), event_id) for event_id, raw in held.items()]
    return [(event_id, message) for (_, message), event_id in sorted(parsed, key=_order)]


def _order(item: tuple[tuple[int, dict[str, Any]], str]) -> tuple[int, str]:
    return item[0][0], item[1]


def handover_ops(
    prefix: str,
    projection: str,
    rebuilt_base: str,
    held: Mapping[str, str],
    live: Mapping[str, str],
) -> list[Op]:
    """The swap's hand-off (section 8): the held events the live run still owes (``live``:
    correlation key -> its live record, absent keys have none) queued as the live run would,
    in the order they were named; then the held set is deleted."""
    keys = OutboxKeys.of(prefix, projection)
    ops: list[Op] = []
    for event_id, m in held_in_order(held):
        if owed(live.get(_key_of(m))):
            event = _dumps(m["event"])
            ops.append(
                ["OUTBOX", keys.ids, keys.queue, keys.seq, event_id, m["topic"], m["key"], event]
            )
    hk = HeldKeys.of(rebuilt_base)
    return [*ops, ["DEL", hk.hold], ["DEL", hk.ts], ["DEL", hk.seq]]


def entry_seq(entry_id: str) -> int:
    """The queue order of a stream entry ``<n>-0``."""
    n, _, _ = entry_id.partition("-")
    return int(n)


def row_of(entry_id: str, fields: Mapping[str, str]) -> OutboxRow:
    return OutboxRow(
        entry_seq(entry_id),
        fields["id"],
        fields["topic"],
        fields["key"],
        json_codec.loads(fields["event"]),
    )


# KEYS: lock; ARGV: token, lease ms. Taken when free, renewed when already this token's.
_TAKE = """
local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return 1
"""

# KEYS: lock; ARGV: token.
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""

# KEYS: lock, queue; ARGV: token, lease ms, limit. The lease is renewed with each round's read;
# a lease that expired (and may have been taken over) is reported, not renewed.
_PENDING = """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return {"lost"} end
redis.call("PEXPIRE", KEYS[1], ARGV[2])
if redis.call("TYPE", KEYS[2])["ok"] == "none" then return {"ok", {}} end
return {"ok", redis.call("XRANGE", KEYS[2], "-", "+", "COUNT", ARGV[3])}
"""

# KEYS: queue, ids; ARGV: published at (epoch s), then entry ids. Each delivered entry leaves
# the queue; its event id stays in ids with the time it was published.
_MARK = """
local done = 0
for i = 2, #ARGV do
  local found = redis.call("XRANGE", KEYS[1], ARGV[i], ARGV[i])
  if #found == 1 then
    local fields = found[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == "id" then redis.call("ZADD", KEYS[2], ARGV[1], fields[j + 1]) end
    end
    done = done + redis.call("XDEL", KEYS[1], ARGV[i])
  end
end
return done
"""

# KEYS: ids; ARGV: published before (epoch s), limit. Pending ids (+inf) never go.
_SWEEP = """
local gone = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", "(" .. ARGV[1], "LIMIT", 0, ARGV[2])
for i = 1, #gone, 1000 do
  redis.call("ZREM", KEYS[1], unpack(gone, i, math.min(i + 999, #gone)))
end
return #gone
"""


class OutboxLeaseLost(TransientStoreError):
    """The publishing lease expired (a round longer than the lease) and may be another
    instance's now: this publisher stops and tries to take it again."""


class RedisOutbox:
    """One projection's outbox on a Redis client of its own (a :class:`RedisStore`'s), the
    Redis :class:`projector.store.base.OutboxStore`. ``owner``: the lease's token; a stable
    one (the configured ``kafka.instance_id``) lets a restarted instance take its own lease
    back at once instead of waiting for it to expire."""

    def __init__(
        self,
        store: RedisStore,
        projection: str,
        lease: float = LEASE_SECONDS,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.projection = projection
        self.keys = OutboxKeys.of(store.prefix, projection)
        self.token = owner or uuid.uuid4().hex
        self.locked = False  # this object took the lease (another one may share the token)
        self._lease_ms = str(max(1, int(lease * 1000)))
        client = store.client
        self._take = client.register_script(_TAKE)
        self._release = client.register_script(_RELEASE)
        self._pending = client.register_script(_PENDING)
        self._mark = client.register_script(_MARK)
        self._sweep = client.register_script(_SWEEP)

    def _fail(self, exc: redis.exceptions.RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"outbox of {self.projection}: {exc}")

    def try_lock(self) -> bool:
        try:
            self.locked = bool(self._take(keys=[self.keys.lock], args=[self.token, self._lease_ms]))
        except redis.exceptions.RedisError as exc:
            raise self._fail(exc) from exc
        return self.locked

    def unlock(self) -> None:
        """Release the lease if it is still this publisher's."""
        self.locked = False
        try:
            self._release(keys=[self.keys.lock], args=[self.token])
        except redis.exceptions.RedisError as exc:
            log.debug("outbox of %s: unlock: %s (the lease expires)", self.projection, exc)

    def pending(self, limit: int) -> list[OutboxRow]:
        """The oldest ``limit`` entries, in queue order; renews the lease (the publisher reads
        first in each round), or raises :class:`OutboxLeaseLost` if it is no longer held."""
        k = self.keys
        try:
            reply = self._pending(keys=[k.lock, k.queue], args=[self.token, self._lease_ms, limit])
        except redis.exceptions.RedisError as exc:
            raise self._fail(exc) from exc
        if reply[0] == "lost":
            self.locked = False
            raise OutboxLeaseLost(f"outbox of {self.projection}: the publishing lease expired")
        return [row_of(entry, dict(zip(f[::2], f[1::2], strict=True))) for entry, f in reply[1]]

    def mark_published(self, seqs: Sequence[int], now: float) -> int:
        if not seqs:
            return 0
        k = self.keys
        try:
            done = self._mark(keys=[k.queue, k.ids], args=[repr(now), *(f"{n}-0" for n in seqs)])
        except redis.exceptions.RedisError as exc:
            raise self._fail(exc) from exc
        return int(done)

    def sweep(self, published_before: float, limit: int = 5000) -> int:
        try:
            return int(self._sweep(keys=[self.keys.ids], args=[repr(published_before), limit]))
        except redis.exceptions.RedisError as exc:
            raise self._fail(exc) from exc

    def figures(self) -> tuple[int, float | None]:
        """Entries pending, and the oldest one's age (Redis's clock, as its ``at``)."""
        with self.store.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.keys.queue)
            pipe.xrange(self.keys.queue, count=1)
            pipe.time()
            count, first, (seconds, micros) = pipe.execute()
        if not first:
            return int(count), None
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return int(count), max(0.0, (now_ms - int(first[0][1]["at"])) / 1000)

    def close(self) -> None:
        """Release the lease if this object took it (a lost connection leaves it to expire;
        the gauges' outbox, which shares the token, never releases the publisher's) and
        close."""
        if self.locked:
            self.unlock()
        self.store.close()
