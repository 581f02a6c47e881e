"""The test harness's own promises: a daemon that does not come up is stopped, and the failure says why."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from service_fixtures import Daemon, tiny_checkpoint  # noqa: F401 (fixture)


def test_a_daemon_not_serving_in_time_is_stopped(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """0.5 s is far less than a start takes (importing torch alone takes longer), so this always times out."""
    d = Daemon(tmp_path / "d", tiny_checkpoint, None)
    with pytest.raises(RuntimeError, match=r"memoryd did not become SERVING within 0.5 s"):
        d.start(timeout=0.5)
    assert d.proc is not None and d.proc.poll() == -signal.SIGKILL, "the daemon was left running"


def test_a_daemon_that_exits_says_why(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", tmp_path / "no-such-checkpoint", None)
    with pytest.raises(RuntimeError, match=r"memoryd exited with [1-9]") as e:
        d.start(timeout=120)
    assert "no-such-checkpoint" in str(e.value), "the error carries the daemon's log tail"
