"""A real Redis Cluster on loopback for the tests: three masters and three replicas from the
same redis-server binary the other tests use, joined with `redis-cli --cluster create`.

Session scoped: it starts once (a few seconds) and tests keep to their own keys. A test that
kills a master calls `heal()` afterwards, which restarts the node (it rejoins as a replica).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster
from service_fixtures import RedisServer, free_port

from memoryd.store.redis_embed import find_redis_server


def cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free too (so p < 55536)."""
    for _ in range(200):
        p = free_port()
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli() -> str:
    return os.path.join(os.path.dirname(find_redis_server()), "redis-cli")


CLUSTER_NODE = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"]
CLUSTER_NODE += ["--appendonly", "no", "--save", ""]  # durability here comes from the replicas


def cluster_node(workdir: Path) -> RedisServer:
    return RedisServer(workdir, cluster_port(), CLUSTER_NODE)


class LocalCluster:
    def __init__(self, workdir: Path, size: int = 6) -> None:
        self.nodes = [cluster_node(workdir / f"n{i}") for i in range(size)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        """Start the nodes and join them; on failure, stop what was started."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(
            [redis_cli(), "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "All 16384 slots covered" not in out.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_healthy()

    def client(self) -> SyncCluster:
        return SyncCluster(host="127.0.0.1", port=self.live()[0].port)

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.alive()]

    def info(self, node: RedisServer) -> dict[str, str]:
        with redis.Redis(port=node.port, socket_timeout=2) as c:
            return c.cluster("info")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says the cluster is ok, and every master has a replica attached."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = all(self.info(n)["cluster_state"] == "ok" for n in self.live())
                if ok and len(self.live()) == len(self.nodes):
                    with redis.Redis(port=self.live()[0].port, socket_timeout=2) as c:
                        shards = c.execute_command("CLUSTER", "NODES").decode().splitlines()
                    flags = [set(ln.split()[2].split(",")) for ln in shards]
                    masters = [f for f in flags if "master" in f and not f & {"fail", "fail?"}]
                    replicas = [f for f in flags if "slave" in f and not f & {"fail", "fail?"}]
                    ok = len(masters) == 3 and len(replicas) == 3
                    ok = ok and all(self._link_up(n) for n in self.live() if self._role(n) == "slave")
            except (redis.RedisError, KeyError):
                ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become healthy")
            time.sleep(0.1)

    def _role(self, node: RedisServer) -> str:
        with redis.Redis(port=node.port, socket_timeout=2) as c:
            return c.info("replication")["role"]

    def _link_up(self, node: RedisServer) -> bool:
        with redis.Redis(port=node.port, socket_timeout=2) as c:
            return c.info("replication").get("master_link_status") == "up"

    def master_of(self, key: str) -> RedisServer:
        with self.client() as c:
            node = c.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(node.port))

    def wait_failover(self, dead: RedisServer, key: str, timeout: float = 30.0) -> RedisServer:
        """Wait until another node serves `key`'s slot as master; returns it."""
        deadline = time.monotonic() + timeout
        slot = redis.cluster.key_slot(key.encode())
        while time.monotonic() < deadline:
            for n in self.live():
                try:
                    with redis.Redis(port=n.port, socket_timeout=1) as c:
                        if c.info("replication")["role"] != "master":
                            continue
                        if n is not dead and self.info(n)["cluster_state"] == "ok" and self._owns(c, slot):
                            return n
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("no failover within the timeout")

    @staticmethod
    def _owns(c: redis.Redis, slot: int) -> bool:
        myid = c.execute_command("CLUSTER", "MYID").decode()
        for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return master[2].decode() == myid
        return False

    def heal(self) -> None:
        """Restart dead nodes (they rejoin from their nodes.conf, as replicas) and wait for health."""
        for n in self.nodes:
            if not n.alive():
                n.start()
        self.wait_healthy()

    def stop(self) -> None:
        for n in self.nodes:
            n.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
