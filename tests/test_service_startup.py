"""`memoryd serve` checks what it needs from the machine before the slow model load (issue 17).

Each case starts the real command with no --checkpoint, in a fresh data dir, where a start that got
as far as the model would convert SmolLM2 (tens of seconds) into `<data_dir>/models/`. The start must
fail within seconds, with exit code 1 and one line naming the setting and the fix, and must leave no
`models/` behind: the proof that the check ran first.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_fixtures import child_env, free_port

FAST = 60.0
"""Seconds a failed start may take: importing torch on a loaded 2-core machine, not a conversion."""


def serve(data_dir: Path, *flags: str) -> tuple[int, str, float]:
    args = [sys.executable, "-m", "memoryd", "serve", "--data-dir", str(data_dir), "--metrics-port", "0", *flags]
    t0 = time.monotonic()
    out = subprocess.run(args, capture_output=True, env=child_env(), timeout=300, stdin=subprocess.DEVNULL)
    return out.returncode, out.stderr.decode(), time.monotonic() - t0


def assert_refused_before_the_model(data_dir: Path, rc: int, err: str, seconds: float, *words: str) -> None:
    assert rc == 1, (rc, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("memoryd: ") and all(w in last for w in words), last
    assert not (data_dir / "models").exists(), "the model was loaded (or converted) before the check"
    assert seconds < FAST, seconds


@pytest.fixture
def held_port():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_grpc_port_in_use(tmp_path: Path, held_port: int) -> None:
    rc, err, dt = serve(tmp_path / "data", "--listen", f"127.0.0.1:{held_port}")
    assert_refused_before_the_model(tmp_path / "data", rc, err, dt, "listen", f"127.0.0.1:{held_port}", "cannot bind")


def test_http_and_metrics_ports_in_use(tmp_path: Path, held_port: int) -> None:
    listen = ("--listen", f"127.0.0.1:{free_port()}")
    rc, err, dt = serve(tmp_path / "data", *listen, "--http-listen", f"127.0.0.1:{held_port}")
    assert_refused_before_the_model(tmp_path / "data", rc, err, dt, "http_listen", "--http-listen")
    args = [*listen, "--metrics-port", str(held_port)]
    rc, err, dt = serve(tmp_path / "data", *args)
    assert_refused_before_the_model(tmp_path / "data", rc, err, dt, "metrics_port")


def test_redis_that_does_not_answer(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    flags = ("--listen", f"127.0.0.1:{free_port()}", "--redis-url", url, "--redis-timeout", "1")
    rc, err, dt = serve(tmp_path / "data", *flags)
    assert_refused_before_the_model(tmp_path / "data", rc, err, dt, "does not answer", "--redis-url")


def test_data_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err, dt = serve(blocker / "data", "--listen", f"127.0.0.1:{free_port()}")
    assert_refused_before_the_model(blocker / "data", rc, err, dt, "data_dir", "--data-dir")


def test_checkpoint_that_is_not_one(tmp_path: Path) -> None:
    flags = ("--listen", f"127.0.0.1:{free_port()}", "--checkpoint", str(tmp_path / "nowhere"))
    rc, err, dt = serve(tmp_path / "data", *flags)
    assert_refused_before_the_model(tmp_path / "data", rc, err, dt, "checkpoint", "config.json")
    assert not (tmp_path / "data" / "redis").exists(), "the embedded Redis was started before the check"
