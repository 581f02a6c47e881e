"""Configuration for several daemons: Redis URLs (one Redis or a cluster), the WAIT knobs,
and daemon names that are unique per process (issue 12)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from service_fixtures import child_env

from memoryd.settings import load_settings
from memoryd.store.redis_client import connect, is_cluster_url, parse_cluster_url


def test_cluster_urls() -> None:
    c = parse_cluster_url("rediss+cluster://app:p%40ss@redis-1:7000,redis-2:7001,[::1]:7002")
    assert c.nodes == (("redis-1", 7000), ("redis-2", 7001), ("::1", 7002))
    assert (c.username, c.password, c.tls) == ("app", "p@ss", True)
    assert parse_cluster_url("redis+cluster://h:1").nodes == (("h", 1),)
    assert is_cluster_url("redis+cluster://h:1") and not is_cluster_url("redis://h:1/0")
    assert isinstance(connect("redis+cluster://127.0.0.1:7000", 1), RedisCluster)
    assert not isinstance(connect("redis://127.0.0.1:6379/0", 1), RedisCluster)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://", "names no node"),
        ("redis+cluster://h1:7000,h2", "'h2' is not host:port"),
        ("redis+cluster://h1:99999", "is not host:port"),
        ("http://h:6379", "use redis://host:6379/0"),
        ("localhost:6379", "use redis://host:6379/0"),
    ],
)
def test_bad_redis_urls_say_what_to_write(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        load_settings({"redis_url": url})


def test_wait_timeout_must_fit_in_the_redis_timeout() -> None:
    with pytest.raises(ValidationError, match=r"redis_wait_timeout .* must be below redis_timeout"):
        load_settings({"redis_wait_replicas": 1, "redis_wait_timeout": 5, "redis_timeout": 5})
    s = load_settings({"redis_wait_replicas": 2, "redis_wait_timeout": 0.5})
    assert (s.redis_wait_replicas, s.redis_wait_timeout) == (2, 0.5)


def _ids_in_a_new_process(listen: str) -> str:
    code = f"from memoryd.settings import load_settings; print(load_settings({{'listen': {listen!r}}}).daemon_id)"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env()
    ).stdout.strip()


def test_daemon_ids_are_unique_per_process_and_stable_on_a_fixed_port() -> None:
    # port 0: two daemons on one host must not share a name (they would take each other's leases)
    a, b = _ids_in_a_new_process("127.0.0.1:0"), _ids_in_a_new_process("127.0.0.1:0")
    assert a != b and a.split("#")[0] == b.split("#")[0]
    here = load_settings({"listen": "127.0.0.1:0"})
    assert here.daemon_id == here.daemon_id == load_settings({"listen": "127.0.0.1:0"}).daemon_id
    # a fixed port: the same name after a restart, so the daemon takes back its own leases at once
    assert _ids_in_a_new_process("127.0.0.1:50999") == _ids_in_a_new_process("127.0.0.1:50999")
    assert _ids_in_a_new_process("127.0.0.1:50999").endswith(":127.0.0.1:50999")
    assert load_settings({"listen": "127.0.0.1:0", "instance_id": "d1"}).daemon_id == "d1"
