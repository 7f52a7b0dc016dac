"""The start-up checks of a Redis server, against real private redis-server processes: one per
test, configured as the case needs, on a free loopback port, killed at teardown."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from projector.store.errors import StoreError, StoreUnavailable, TransientStoreError
from projector.store.redis_checks import RedisUnfit, check_server
from tests.integration.redis_server import AOF, NO_PERSISTENCE, RedisServers, free_port

pytestmark = pytest.mark.integration

StartRedis = Callable[..., redis.Redis]


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """``start_redis(*args, password=None)`` starts a private redis-server with these extra
    arguments in its own directory and returns a client for it; all are stopped afterwards."""
    servers = RedisServers(tmp_path)

    def start(*args: str, password: str | None = None) -> redis.Redis:
        return servers.start(*args, password=password).client()

    yield start
    servers.close()


def test_aof_on_passes_without_warnings(start_redis: StartRedis) -> None:
    """Proves a server with appendonly yes (appendfsync everysec, the default) and no memory
    limit is fit: no error, nothing to warn about."""
    assert check_server(start_redis(*AOF), disposable=False) == []


def test_aof_with_appendfsync_no_passes_with_a_warning(start_redis: StartRedis) -> None:
    """Proves AOF left to the OS to flush (appendfsync no) is accepted but warned about,
    naming the setting to change."""
    warnings = check_server(start_redis(*AOF, "--appendfsync", "no"), disposable=False)
    assert len(warnings) == 1
    assert "appendfsync everysec" in warnings[0]


def test_snapshots_only_pass_with_a_rollback_warning(start_redis: StartRedis) -> None:
    """Proves a server persisting by RDB snapshots only is accepted, with one warning that says
    a crash is a rollback of views and checkpoints together (re-applied from the older
    checkpoint), not corruption, and how to lose less."""
    client = start_redis("--save", "900 1 300 10", "--appendonly", "no")
    warnings = check_server(client, disposable=False)
    assert len(warnings) == 1
    assert "snapshots only (save 900 1 300 10)" in warnings[0]
    assert "rollback, not corruption" in warnings[0]
    assert "re-applies from the older checkpoint" in warnings[0]
    assert "appendonly yes" in warnings[0]


def test_no_persistence_is_refused_saying_what_to_set(start_redis: StartRedis) -> None:
    """Proves a server with neither AOF nor a save schedule is refused, and the message names
    the server and every way out: appendonly yes with a safe fsync, a save schedule, or
    redis.disposable."""
    client = start_redis(*NO_PERSISTENCE)
    port = client.connection_pool.connection_kwargs["port"]
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=False)
    message = str(info.value)
    assert message == (
        f"Redis at 127.0.0.1:{port}/0 does not persist: set appendonly yes (recommended, with"
        " appendfsync everysec or always) or a save schedule; or set redis.disposable: true if"
        " the views may be rebuilt after a Redis restart"
    )
    assert isinstance(info.value, StoreError)
    assert not isinstance(info.value, TransientStoreError)


def test_no_persistence_when_disposable_is_only_a_warning(start_redis: StartRedis) -> None:
    """Proves redis.disposable turns the missing persistence into a warning that says why the
    server is used anyway, without advising to set what is already set."""
    warnings = check_server(start_redis(*NO_PERSISTENCE), disposable=True)
    assert len(warnings) == 1
    assert "does not persist" in warnings[0]
    assert "redis.disposable: true, so projector runs anyway" in warnings[0]
    assert "or set redis.disposable" not in warnings[0]


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_allkeys_eviction_with_maxmemory_is_refused(start_redis: StartRedis, policy: str) -> None:
    """Proves a memory limit with an allkeys-* policy, which may evict projector's keys, is
    refused even with AOF on, and the message names the policy and the fix."""
    client = start_redis(*AOF, "--maxmemory", "64mb", "--maxmemory-policy", policy)
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=False)
    message = str(info.value)
    assert f"maxmemory-policy {policy}" in message
    assert "set maxmemory-policy noeviction" in message
    assert "redis.disposable: true" in message


def test_allkeys_eviction_without_maxmemory_passes(start_redis: StartRedis) -> None:
    """Proves an allkeys-* policy without a memory limit (maxmemory 0: nothing is ever evicted
    on a 64-bit server) is accepted."""
    client = start_redis(*AOF, "--maxmemory", "0", "--maxmemory-policy", "allkeys-lru")
    assert check_server(client, disposable=False) == []


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-ttl", "noeviction"])
def test_volatile_and_noeviction_policies_pass(start_redis: StartRedis, policy: str) -> None:
    """Proves policies that evict only keys with a TTL (projector sets none) or nothing at all
    are accepted with a memory limit."""
    client = start_redis(*AOF, "--maxmemory", "64mb", "--maxmemory-policy", policy)
    assert check_server(client, disposable=False) == []


def test_both_problems_are_reported_at_once(start_redis: StartRedis) -> None:
    """Proves a server that neither persists nor keeps its keys is refused with both problems
    in one message, so both are fixed in one go; disposable turns both into warnings."""
    args = (*NO_PERSISTENCE, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    client = start_redis(*args)
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=False)
    assert "does not persist" in str(info.value)
    assert "maxmemory-policy allkeys-lru" in str(info.value)

    warnings = check_server(client, disposable=True)
    assert len(warnings) == 2
    assert "silent corruption" in warnings[1]


def test_config_renamed_with_aof_on_passes_through_info(start_redis: StartRedis) -> None:
    """Proves that when CONFIG is disabled (renamed to "", as managed services do) the check
    falls back to INFO: AOF on there is enough."""
    client = start_redis(*AOF, "--rename-command", "CONFIG", "")
    with pytest.raises(redis.ResponseError):
        client.config_get("appendonly")
    assert check_server(client, disposable=False) == []


def test_config_renamed_with_aof_off_is_refused(start_redis: StartRedis) -> None:
    """Proves that when CONFIG is disabled and INFO says AOF is off, the server is refused
    (INFO cannot show a snapshot schedule), and the message says why projector cannot tell."""
    client = start_redis("--save", "900 1", "--appendonly", "no", "--rename-command", "CONFIG", "")
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=False)
    message = str(info.value)
    assert "refused CONFIG GET" in message
    assert "aof_enabled:0" in message
    assert "set appendonly yes" in message

    assert "refused CONFIG GET" in check_server(client, disposable=True)[0]


def test_config_renamed_still_sees_allkeys_eviction_through_info(start_redis: StartRedis) -> None:
    """Proves the eviction check also falls back to INFO memory when CONFIG is disabled."""
    args = (*AOF, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lfu")
    client = start_redis(*args, "--rename-command", "CONFIG", "")
    with pytest.raises(RedisUnfit, match="maxmemory-policy allkeys-lfu"):
        check_server(client, disposable=False)


@pytest.mark.parametrize("disposable", [False, True])
def test_cluster_is_refused_even_when_disposable(
    start_redis: StartRedis, tmp_path: Path, disposable: bool
) -> None:
    """Proves a Redis Cluster node is refused, whatever redis.disposable says (a batch's keys
    would span hash slots), with the message that says where to point redis.url instead."""
    nodes = tmp_path / f"nodes-{disposable}.conf"
    # The bus port defaults to port + 10000, which a free port above 55535 cannot have.
    cluster = ("--cluster-enabled", "yes", "--cluster-port", str(free_port()))
    client = start_redis(*AOF, *cluster, "--cluster-config-file", str(nodes))
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=disposable)
    assert str(info.value).endswith(
        "Redis Cluster is not supported: a batch's keys span hash slots; point redis.url at a"
        " standalone or Sentinel-managed primary"
    )


def test_message_names_the_server_but_never_the_password(start_redis: StartRedis) -> None:
    """Proves the server is named by host, port and db only: a password in the URL stays out
    of the message."""
    password = "s3cr3t-Pa55"
    client = start_redis(*NO_PERSISTENCE, "--requirepass", password, password=password)
    with pytest.raises(RedisUnfit) as info:
        check_server(client, disposable=False)
    assert "Redis at 127.0.0.1:" in str(info.value)
    assert password not in str(info.value)


def test_wrong_password_is_a_store_error_not_a_transient_one(start_redis: StartRedis) -> None:
    """Proves refused credentials are reported as a StoreError naming redis.url, not as an
    unreachable server to retry forever (redis-py's AuthenticationError is a
    ConnectionError)."""
    client = start_redis(*AOF, "--requirepass", "right", password="right")
    port = client.connection_pool.connection_kwargs["port"]
    wrong_password = "n0t-the-Pa55"
    wrong = redis.Redis.from_url(f"redis://:{wrong_password}@127.0.0.1:{port}/0")
    try:
        with pytest.raises(StoreError, match=r"refused the credentials in redis\.url") as info:
            check_server(wrong, disposable=False)
        assert not isinstance(info.value, TransientStoreError)
        assert wrong_password not in str(info.value)
    finally:
        wrong.close()


def test_unreachable_server_is_store_unavailable() -> None:
    """Proves a server that does not answer is StoreUnavailable (transient: try again), naming
    the address."""
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=2)
    try:
        with pytest.raises(
            StoreUnavailable, match=re.escape(f"127.0.0.1:{port}/0 cannot be reached")
        ):
            check_server(client, disposable=False)
    finally:
        client.close()
