"""Redis side of ``projector rebuild``: a new version of the projection's keys, then one
pointer to flip.

A projection's state and views live under a version (``<prefix>:s:<name>:<version>:...`` and
``<prefix>:v:<view_schema>:<version>:...``); ``<prefix>:s:<name>:version`` says which one the
daemon writes and ``<prefix>:v:<view_schema>:active`` which one readers read. The rebuild is a
projection of its own to the fence (``<name>#rebuild``: its epochs and checkpoints) and builds
the next version. The swap:

1. pauses the live batches (a key their script checks; it expires by itself should the
   rebuild die, so the daemon never waits on a dead rebuild);
2. lets the caller read up to the live checkpoints, which no longer move;
3. in one script: checks the pause still holds and the rebuild reached the live checkpoints,
   moves the live checkpoints to the rebuilt ones (the epochs stay: no rebalance) and, for a
   correlation, each partition's event-time progress (``times``: the higher high, the live
   ``caught_up``), flips both pointers, forgets the rebuild and lifts the pause.
The correlation records (``co:<key>``, ``codue``, ``coopen``) are versioned like the rest of
the state: the flip makes the rebuilt ones the live ones, and the live ones go with the old
version. ``times`` sits beside the fence, not versioned: the rebuild's own is carried over by
the swap and deleted by it, by ``abandon`` and by every start.
A live batch planned on the old version before the flip fails its WATCH on the pointer and is
planned again on the new one. The old version's keys are then deleted in the background.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from projector.store import redis_outbox
from projector.store.base import (
    REBUILD,
    LivePartition,
    NotCaughtUp,
    RebuildRunning,
    TopicPartition,
)
from projector.store.errors import StoreError
from projector.store.migrate import ViewMigrations
from projector.store.redis import (
    Keys,
    RedisStateCorrupt,
    RedisStore,
    reader_pointer,
    version_pointer,
)

log = logging.getLogger(__name__)

LOCK_SECONDS = 30.0  # a rebuild's lock outlives its process by at most this
PAUSE_SECONDS = 30.0  # the longest live batches wait for a swap, should the rebuild die in it
OLD_VERSION_GRACE = 60.0  # the swapped-out version's keys expire this long after the swap

_SWAP = """
-- KEYS: paused, live offsets, rebuild offsets, live version, reader pointer, rebuild target,
--       rebuild epochs, rebuild owners, rebuild starts, live times, rebuild times
-- ARGV: the pause token, then the live projection's partition fields and their live
--       checkpoints (the rebuild must have reached them), in pairs
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return {"unpaused"} end
for i = 2, #ARGV, 2 do
  local rebuilt = tonumber(redis.call("HGET", KEYS[3], ARGV[i]) or "0")
  if rebuilt < tonumber(ARGV[i + 1]) then return {"behind", ARGV[i]} end
end
local target = redis.call("GET", KEYS[6])
if not target then return {"nothing"} end
-- A correlation's event-time progress ("<high>,<0|1>", high empty for none) moves with the
-- checkpoints: the higher of the live and the rebuilt high (it never goes back), the live
-- caught-up flag kept ("0" where the live run has none). Worked out before anything is
-- written: Redis does not roll a script back.
local function parse(text)
  local high, caught_up = string.match(text, "^(%-?%d*),([01])$")
  if high == "-" then return nil end
  return high, caught_up
end
local times = {}
for i = 2, #ARGV, 2 do
  local rebuilt = redis.call("HGET", KEYS[11], ARGV[i])
  if rebuilt then
    local high = parse(rebuilt)
    local live_high, caught_up = parse(redis.call("HGET", KEYS[10], ARGV[i]) or ",0")
    if not high or not live_high then return {"damaged", ARGV[i]} end
    if high == "" or (live_high ~= "" and tonumber(live_high) > tonumber(high)) then
      high = live_high
    end
    times[#times + 1] = {ARGV[i], high .. "," .. caught_up}
  end
end
for i = 2, #ARGV, 2 do
  local rebuilt = redis.call("HGET", KEYS[3], ARGV[i])
  local live = tonumber(redis.call("HGET", KEYS[2], ARGV[i]) or "-1")
  if rebuilt and tonumber(rebuilt) > live then redis.call("HSET", KEYS[2], ARGV[i], rebuilt) end
end
for _, t in ipairs(times) do redis.call("HSET", KEYS[10], t[1], t[2]) end
local old = redis.call("GET", KEYS[4]) or "1"
redis.call("SET", KEYS[4], target)
redis.call("SET", KEYS[5], target)
redis.call("DEL", KEYS[3], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[11], KEYS[1])
return {"swapped", old, target}
"""


class RedisRebuildStore:
    """The store operations of one projection's rebuild in Redis (the same ones as
    :class:`projector.store.postgres_rebuild.PgRebuildStore`)."""

    def __init__(self, store: RedisStore, projection: str, view_schema: str) -> None:
        self.store = store
        self.projection = projection
        self.name = f"{projection}{REBUILD}"
        self.view_schema = view_schema
        self.shadow = view_schema  # the same namespace, at the version being built
        prefix = store.prefix
        self._fence = f"{prefix}:s:{self.name}"
        self._target = version_pointer(prefix, self.name)
        self._live_version = version_pointer(prefix, projection)
        self._reader = reader_pointer(prefix, view_schema)
        self._paused = f"{prefix}:s:{projection}:paused"
        self._lock = f"{prefix}:s:{projection}:rebuilding"
        self._old: str | None = None
        self._swap = store.client.register_script(_SWAP)

    @property
    def _client(self) -> Any:
        return self.store.client

    # -- one rebuild at a time ------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the projection's rebuild lock: a key with a token and a lease, renewed while
        the block runs, so a killed rebuild frees it within the lease."""
        token = uuid.uuid4().hex
        ms = int(LOCK_SECONDS * 1000)
        if not self._client.set(self._lock, token, nx=True, px=ms):
            left = self._client.pttl(self._lock)
            raise RebuildRunning(
                f"another rebuild of {self.projection} is running (its lock {self._lock} is"
                f" held for {max(0, left) / 1000:.0f}s more unless renewed); wait for it, or stop"
                " it (it resumes where it stopped when started again)"
            )
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LOCK_SECONDS / 3):
                if self._client.get(self._lock) == token:
                    self._client.pexpire(self._lock, ms)

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(5)
            if self._client.get(self._lock) == token:
                self._client.delete(self._lock)

    # -- what there is ----------------------------------------------------------------------
    def live_partitions(self) -> dict[TopicPartition, LivePartition]:
        fence = f"{self.store.prefix}:s:{self.projection}"
        offsets = self._client.hgetall(f"{fence}:offsets")
        starts = self._client.hgetall(f"{fence}:starts")
        claimed = self._client.hkeys(f"{fence}:epochs")
        out = {}
        for field in {*claimed, *offsets, *starts}:
            topic, _, part = field.rpartition(":")
            out[(topic, int(part))] = LivePartition(
                None if field not in offsets else int(offsets[field]),
                None if field not in starts else int(starts[field]),
            )
        return out

    def in_progress(self) -> bool:
        return bool(self._client.exists(self._target))

    def _version(self) -> int:
        return int(self._client.get(self._live_version) or 1)

    # -- start ------------------------------------------------------------------------------
    def start(self, views: Sequence[ViewMigrations]) -> None:
        """The next version, empty, to build; anything left by an earlier rebuild goes."""
        del views  # Redis views need no schema
        self.abandon()
        target = self._version() + 1
        self._delete_version(target)
        self._client.set(self._target, target)

    def abandon(self) -> None:
        """Delete what an earlier rebuild left (``--restart``, and every fresh start): the
        version it built (state and views, correlation records included) and, beside its
        fence, what is not versioned: its checkpoints and a correlation's event-time progress
        (``times``; kept, the next rebuild would start from that one's watermark and close
        windows before their parts are read)."""
        target = self._client.get(self._target)
        if target is not None and int(target) != self._version():
            self._delete_version(int(target))
        self._client.delete(
            *(f"{self._fence}:{k}" for k in ("epochs", "offsets", "owners", "starts", "times")),
            self._target,
        )

    def _version_keys(self, version: int) -> Iterator[list[str]]:
        """A version's keys (state and views), in chunks."""
        prefix = self.store.prefix
        for pattern in (
            f"{prefix}:s:{self.projection}:{version}:*",
            f"{prefix}:v:{self.view_schema}:{version}:*",
        ):
            chunk: list[str] = []
            for key in self._client.scan_iter(match=pattern, count=1000):
                chunk.append(key)
                if len(chunk) >= 500:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    def _delete_version(self, version: int) -> None:
        """Delete a version that no batch writes: the one a rebuild builds, with its lock held
        and before its batches start, never the live one. So it writes stream hashes without
        setting their version token (``v``, see :mod:`projector.store.redis`) safely; a
        deleted hash reads as no token, which a batch that read one finds changed anyway."""
        for chunk in self._version_keys(version):
            self._client.unlink(*chunk)

    def _expire_version(self, version: int, ms: int) -> None:
        """Only the swapped-out version: a live batch still planned on it fails its WATCH on
        the version pointer, so it can't race with the expiry of its stream hashes."""
        for chunk in self._version_keys(version):
            with self._client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.pexpire(key, ms)
                pipe.execute()

    # -- the swap ---------------------------------------------------------------------------
    def swap(
        self,
        catch_up: Callable[[Mapping[TopicPartition, int]], None],
        lock_timeout: float,
        partitions: Sequence[TopicPartition],
    ) -> dict[TopicPartition, int]:
        """Pause the live batches, let ``catch_up(targets)`` read up to the live checkpoints,
        then flip to the rebuilt version in one script (see the module docstring)."""
        token = uuid.uuid4().hex
        self._client.set(self._paused, token, px=int(PAUSE_SECONDS * 1000))
        try:
            # Redis runs one command at a time: every live batch script from now on sees the
            # pause, and every one before it has committed whole. The live checkpoints stand.
            del lock_timeout
            targets = {tp: p.next_offset or 0 for tp, p in self.live_partitions().items()}
            catch_up(targets)
            # Every partition the live projection consumes, with its live checkpoint (0: none);
            # a history topic read for the rebuild only is not carried over.
            fields = sorted(set(partitions) | set(targets))
            args = [token] + [x for tp in fields for x in (f"{tp[0]}:{tp[1]}", targets.get(tp, 0))]
            keys = [
                self._paused,
                f"{self.store.prefix}:s:{self.projection}:offsets",
                f"{self._fence}:offsets",
                self._live_version,
                self._reader,
                self._target,
                f"{self._fence}:epochs",
                f"{self._fence}:owners",
                f"{self._fence}:starts",
                f"{self.store.prefix}:s:{self.projection}:times",
                f"{self._fence}:times",
            ]
            carried = set(fields)
            rebuilt = {
                tp: int(o or 0)
                for tp, o in self.store.checkpoints(self.name).items()
                if tp in carried
            }
            self._hand_over_outbox(token)
            verdict = self._swap(keys=keys, args=args)
            self.store.forget_all()  # what it last saw of either version is history now
        finally:
            if self._client.get(self._paused) == token:
                self._client.delete(self._paused)
        if verdict[0] == "behind":
            raise NotCaughtUp(f"the rebuild is behind on {verdict[1]}")
        if verdict[0] == "unpaused":
            raise NotCaughtUp("the pause expired before the rebuild caught up")
        if verdict[0] == "damaged":
            raise RedisStateCorrupt(
                f"projector's own state in Redis is damaged: the event-time progress of"
                f" {verdict[1]} in {keys[9]} or {keys[10]} is not <high>,<0|1>"
            )
        if verdict[0] != "swapped":
            raise StoreError(f"the swap did not happen: {verdict[0]} (try again)")
        self._old = verdict[1]
        return {tp: max(o, targets.get(tp, 0)) for tp, o in rebuilt.items()}

    def _hand_over_outbox(self, token: str) -> int:
        """The rebuild's held business events (``cohold``) that the live run still owes become
        pending live entries, in the order they were named; then the held set goes (as
        PostgreSQL's ``_hand_over_outbox``; the rule is :func:`redis_outbox.owed`). Runs in the
        pause, before the flip, so the live records it reads no longer move; the pause is
        WATCHed, so if it ended meanwhile nothing is written. Run just before the swap script
        rather than in it: should the swap then fail, the events it queued carry the ids the
        live run would publish them under (``outbox:ids`` keeps one), so nothing is lost or
        doubled. The held set of a rebuild started again or abandoned goes with its version."""
        target = self._client.get(self._target)
        if target is None:
            return 0
        prefix = self.store.prefix
        live = self.store.keys(self.projection)
        base = Keys(prefix, self.name, str(target)).base
        held_key = redis_outbox.HeldKeys.of(base).hold
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.watch(self._paused, held_key)
                held = pipe.hgetall(held_key) if pipe.get(self._paused) == token else {}
                if not held:
                    return 0
                keys = redis_outbox.correlation_keys(held)
                found = pipe.mget([live.correlation(k) for k in keys])
                records = {k: r for k, r in zip(keys, found, strict=True) if r is not None}
                ops = redis_outbox.handover_ops(prefix, self.projection, base, held, records)
                verdict = self.store.apply(pipe, [], ops)
        except redis.exceptions.WatchError:
            raise NotCaughtUp("the pause expired while the held events were handed over") from None
        if verdict[0] != "ok":
            raise RedisStateCorrupt(f"projector's outbox in Redis is damaged: {verdict}")
        queued = len(ops) - 3
        if queued:
            log.info("rebuild %s: %d business event(s) queued at the swap", self.projection, queued)
        return queued

    def drop_old(self, lock_timeout: float) -> bool:
        """Let the swapped-out version's keys expire after a grace: a reader that read the
        pointer just before the flip still finds that version whole for that long."""
        del lock_timeout
        if self._old is not None and int(self._old) != self._version():
            self._expire_version(int(self._old), int(OLD_VERSION_GRACE * 1000))
        return True
