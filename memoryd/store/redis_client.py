"""The Redis client for `--redis-url`: one Redis, or a Redis Cluster.

Schemes: `redis://`, `rediss://` and `unix://` (one Redis, redis-py's own URL forms), and
`redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` for TLS)
for a Redis Cluster. redis-py has no URL that says "cluster" (`RedisCluster.from_url` takes a
plain `redis://` with one seed node), so a plain URL cannot tell the two apart without
probing the server; an explicit scheme makes the choice visible in the configuration, and
the comma list gives the client several seed nodes, so it starts while one of them is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AskError, ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,  # a failover in progress (MasterDownError too)
    TryAgainError,  # a slot being moved
    AskError,  # MovedError too: the client's slot map is behind
    SlotNotCoveredError,
)
"""Redis failures that mean "not now" (answered UNAVAILABLE, safe to retry), on one Redis or a cluster."""

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SINGLE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class ClusterURL:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    host = host.strip("[]")  # [::1]:7000
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: {item!r} is not host:port (example: redis+cluster://redis-1:7000,redis-2:7000)")
    return host, int(port)


def parse_cluster_url(url: str) -> ClusterURL:
    """`redis+cluster://[user:pass@]h:p[,h:p...]` -> its seed nodes and credentials."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"{url!r} is not a cluster URL (redis+cluster://host:port,host:port)")
    rest = rest.split("/", 1)[0].split("?", 1)[0]  # a cluster has only db 0; no options are read
    creds, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
    items = [h for h in hosts.split(",") if h.strip()]
    if not items:
        raise ValueError(f"{url!r} names no node (example: redis+cluster://redis-1:7000,redis-2:7000)")
    nodes = tuple(_host_port(h, url) for h in items)
    return ClusterURL(nodes, username, password, scheme == "rediss+cluster")


def check_url(url: str) -> str:
    """The URL if memoryd can use it, else ValueError naming the accepted forms."""
    scheme = url.partition("://")[0]
    if scheme in CLUSTER_SCHEMES:
        parse_cluster_url(url)
    elif scheme not in SINGLE_SCHEMES or "://" not in url:
        raise ValueError(
            f"redis_url {url!r}: use redis://host:6379/0, rediss://..., unix:///path/redis.sock, "
            "or redis+cluster://host:port,host:port for a Redis Cluster"
        )
    return url


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def connect(url: str, timeout: float) -> aioredis.Redis | RedisCluster:
    """A client for `url`; every call fails after `timeout` seconds rather than hanging.

    One Redis: no client-side retries (a failure is UNAVAILABLE and the caller retries).
    A cluster: a few quick retries, so a call in flight during a failover or a slot move
    follows the new topology instead of failing at once.
    """
    if not is_cluster_url(url):
        return aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
    c = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in c.nodes],
        username=c.username,
        password=c.password,
        ssl=c.tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    )
