"""The start-up checks of a Redis server: is it fit to hold projector's views and checkpoints?

A batch's keys (views, positions, checkpoint) must live on one node, must survive a restart, and
must not be evicted: a lost view key next to a surviving checkpoint is silent corruption, not a
rollback. So Redis Cluster is refused, and so are a server that does not persist and one whose
eviction policy may pick projector's keys, unless ``redis.disposable`` says the views may be lost
(then those two are warnings). The settings come from ``CONFIG GET``; where a managed service
disables it, from ``INFO``, which tells less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from projector.store.errors import StoreError, StoreUnavailable

_DISPOSABLE = " (redis.disposable: true, so projector runs anyway)"
_AFTER_RESTART = "; or set redis.disposable: true if the views may be rebuilt after a Redis restart"
_AFTER_EVICTION = "; or set redis.disposable: true if the views may lose keys and be rebuilt"
_CONFIG_NAMES = ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy")


class RedisUnfit(StoreError):
    """The Redis server cannot safely hold projector's state; the message says what to set."""


@dataclass(frozen=True)
class _Settings:
    """What the checks need to know of the server; ``save`` is None when it cannot be seen."""

    appendonly: bool
    appendfsync: str | None
    save: str | None
    maxmemory: int
    policy: str | None
    config_refused: bool


def check_server(client: redis.Redis, disposable: bool) -> list[str]:
    """Check the server ``client`` talks to; return warnings for the caller to log.

    Raises RedisUnfit when the server is a Redis Cluster node (always), or does not persist or
    may evict projector's keys (unless ``disposable``: then those are warnings); StoreUnavailable
    when it cannot be reached; StoreError when it refuses the credentials.
    """
    where = _where(client)
    try:
        return _check(client, where, disposable)
    except redis.AuthenticationError as exc:
        raise StoreError(f"Redis at {where} refused the credentials in redis.url: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis at {where} cannot be reached: {exc}") from exc


def _check(client: redis.Redis, where: str, disposable: bool) -> list[str]:
    if int(client.info("cluster").get("cluster_enabled", 0)):
        raise RedisUnfit(
            f"Redis at {where}: Redis Cluster is not supported: a batch's keys span hash slots;"
            " point redis.url at a standalone or Sentinel-managed primary"
        )
    settings = _settings(client)
    persistence, warnings = _persistence(settings, where)
    problems = [p for p in (persistence, _eviction(settings, where)) if p]
    if problems and not disposable:
        raise RedisUnfit("\n".join(problem + hint for problem, hint in problems))
    return [*warnings, *(problem + _DISPOSABLE for problem, _ in problems)]


def _settings(client: redis.Redis) -> _Settings:
    try:
        # One name per call: Redis before 7.0 takes a single pattern.
        got = {name: client.config_get(name).get(name) for name in _CONFIG_NAMES}
    except redis.ResponseError:  # renamed or disabled (managed services), or denied by an ACL
        return _settings_from_info(client)
    return _Settings(
        appendonly=got["appendonly"] == "yes",
        appendfsync=got["appendfsync"],
        save=(got["save"] or "").strip(),
        maxmemory=int(got["maxmemory"] or 0),
        policy=got["maxmemory-policy"],
        config_refused=False,
    )


def _settings_from_info(client: redis.Redis) -> _Settings:
    persistence: dict[str, Any] = client.info("persistence")
    memory: dict[str, Any] = client.info("memory")
    policy = memory.get("maxmemory_policy")
    return _Settings(
        appendonly=int(persistence.get("aof_enabled", 0)) == 1,
        appendfsync=None,
        save=None,  # INFO shows when the last snapshot ran, not whether any is scheduled
        maxmemory=int(memory.get("maxmemory", 0)),
        policy=str(policy) if policy is not None else None,
        config_refused=True,
    )


# A problem: what is wrong and what to set, then how to accept it instead.
_Problem = tuple[str, str]


def _persistence(s: _Settings, where: str) -> tuple[_Problem | None, list[str]]:
    """The problem (None: none) and the warnings about how the server persists."""
    if s.appendonly:
        if s.appendfsync == "no":
            return None, [
                f"Redis at {where} has appendonly yes but appendfsync no: the OS decides when"
                " the AOF reaches the disk, so a machine crash can lose tens of seconds of"
                " writes (views and checkpoints together: projector re-applies from the older"
                " checkpoint); set appendfsync everysec to lose at most a second"
            ]
        return None, []
    if s.save:
        return None, [
            f"Redis at {where} persists by snapshots only (save {s.save}): a crash loses the"
            " writes since the last snapshot, views and checkpoints together, so it is a"
            " rollback, not corruption: projector re-applies from the older checkpoint (Kafka"
            " must still hold those messages); set appendonly yes to lose at most a second"
        ]
    if s.config_refused:
        problem = (
            f"Redis at {where} refused CONFIG GET (renamed or disabled, as on many managed"
            " services), so projector cannot see whether snapshots are scheduled, and INFO"
            " persistence says AOF is off (aof_enabled:0): set appendonly yes (recommended,"
            " with appendfsync everysec or always)"
        )
        return (problem, _AFTER_RESTART), []
    problem = (
        f"Redis at {where} does not persist: set appendonly yes (recommended, with appendfsync"
        " everysec or always) or a save schedule"
    )
    return (problem, _AFTER_RESTART), []


def _eviction(s: _Settings, where: str) -> _Problem | None:
    """The problem with the eviction policy, None if it leaves projector's keys alone."""
    # volatile-* policies evict only keys with a TTL and projector sets none, so they (and
    # noeviction) never take its keys; at maxmemory 0 nothing is evicted at all.
    if s.maxmemory <= 0 or not (s.policy or "").startswith("allkeys-"):
        return None
    problem = (
        f"Redis at {where} has maxmemory {s.maxmemory} with maxmemory-policy {s.policy}, which"
        " may evict projector's keys (a view key gone while its checkpoint stays is silent"
        " corruption, not a rollback): set maxmemory-policy noeviction (volatile-* serve too),"
        " or maxmemory 0"
    )
    return problem, _AFTER_EVICTION


def _where(client: redis.Redis) -> str:
    """host:port/db or the socket path, for messages: never the password."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"{kwargs['path']} (db {db})"
    if "host" not in kwargs:  # a Sentinel pool: the primary is looked up per connection
        return "redis.url"
    return f"{kwargs['host']}:{kwargs.get('port', 6379)}/{db}"
