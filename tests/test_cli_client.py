"""`memoryd sessions ...` and `memoryd chat` against a real daemon (issue 11).  The chat runs in a real
terminal: a tmux pane, driven by send-keys and read by capture-pane, as a person would use it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from memoryd_sdk import MemoryClient, NotFound

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS  # noqa: E402
from service_fixtures import Daemon, child_env  # noqa: E402

pytest_plugins = ["sdk_fixtures"]


def memoryd(d: Daemon, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "memoryd", *args, "--daemon", d.address, "--token", TOKENS["alice"]]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=child_env(), timeout=120)


def test_sessions_ls_show_rm_export_import(sdk_daemon: Daemon, tmp_path: Path) -> None:
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        s = c.create_session("cli-notes", metadata={"who": "cli"})
        s.append("remember the milk")
    ls = memoryd(sdk_daemon, "sessions", "ls")
    assert ls.returncode == 0, ls.stderr
    row = next(line for line in ls.stdout.decode().splitlines() if line.startswith("cli-notes "))
    assert row.split()[1] == "17" and "who=cli" in row
    show = memoryd(sdk_daemon, "sessions", "show", "cli-notes")
    assert (
        show.returncode == 0 and '"offset": 17' in show.stdout.decode() and '"tenant": "alice"' in show.stdout.decode()
    )

    path = tmp_path / "notes.memoryd"
    ex = memoryd(sdk_daemon, "sessions", "export", "cli-notes", str(path))
    assert ex.returncode == 0 and path.is_file() and "offset 17" in ex.stderr.decode()
    im = memoryd(sdk_daemon, "sessions", "import", str(path), "--id", "cli-notes-copy")
    assert im.returncode == 0 and im.stdout.decode().strip() == "imported cli-notes-copy: offset 17"
    piped = memoryd(sdk_daemon, "sessions", "export", "cli-notes", "-")  # to stdout, then back from stdin
    back = memoryd(sdk_daemon, "sessions", "import", "-", "--id", "cli-notes-piped", stdin=piped.stdout)
    assert back.returncode == 0 and "offset 17" in back.stdout.decode()

    rm = memoryd(sdk_daemon, "sessions", "rm", "cli-notes-copy", "cli-notes-piped")
    assert rm.returncode == 0 and rm.stdout.decode().count("(offset 17)") == 2
    missing = memoryd(sdk_daemon, "sessions", "show", "cli-notes-copy")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr.decode()
    bad = subprocess.run(
        [sys.executable, "-m", "memoryd", "sessions", "ls", "--daemon", sdk_daemon.address],
        capture_output=True,
        env=child_env(),
        timeout=60,
    )
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr.decode()


class Tmux:
    """A private tmux server (its own socket) with one pane running a command."""

    def __init__(self, command: str) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (apt-get install tmux; .ci/run does)")
        self.sock = f"memoryd-test-{uuid.uuid4().hex[:8]}"
        self.tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "50", command)

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args], capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.decode()

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", "t")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.screen())
            if m:
                return m
            assert time.monotonic() < deadline, f"{pattern!r} never appeared:\n{self.screen()}"
            time.sleep(0.1)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=30)


def chat_command(d: Daemon, *args: str) -> str:
    env = child_env()
    keep = {k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "PATH") if k in env}
    cmd = [sys.executable, "-m", "memoryd", "chat", *args, "--daemon", d.address, "--token", TOKENS["alice"]]
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in keep.items()) + " " + shlex.join(cmd)


def test_chat_in_a_real_terminal(sdk_daemon: Daemon) -> None:
    sid = f"tmux-chat-{uuid.uuid4().hex[:6]}"
    opts = ("--max-tokens", "8", "--temperature", "0", "--system", "Be brief.")
    term = Tmux(chat_command(sdk_daemon, sid, *opts))
    try:
        term.wait_for(rf"session {sid} \(offset 0; plain-text turns\)")
        term.wait_for(r"you> $|you> \n")
        term.type("The key is under the mat.")
        m = term.wait_for(r"bot> ([\s\S]*?)\n\[offset (\d+)\]")
        first = int(m.group(2))
        with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
            assert c.get_session(sid).offset == first  # the turn, with the system prompt, is in the session
            system_and_turn = len("<|system|>\nBe brief.<|end|>\n<|user|>\nThe key is under the mat.<|end|>\n")
            assert first > system_and_turn + len("<|assistant|>\n")
            twin = c.session(sid).fork(temporary=True)
            with twin:
                expected = twin.reply([("user", "Where is it?")], max_tokens=8).generation
        term.type("Where is it?")
        m2 = term.wait_for(r"\[offset (\d+)\]\s*\nyou> Where is it\?\nbot> ([\s\S]*?)\n\[offset (\d+)\]")
        assert int(m2.group(3)) - first == expected.committed_tokens  # only the new turn and its reply
        term.type("/exit")
        term.wait_for(rf"bye; session {sid} is kept \(offset {m2.group(3)}\)")
    finally:
        term.close()

    again = Tmux(chat_command(sdk_daemon, sid))  # the conversation is still there
    try:
        again.wait_for(rf"session {sid} \(offset {m2.group(3)}; plain-text turns\)")
        again.type("/exit")
        again.wait_for("bye;")
    finally:
        again.close()
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        c.delete_session(sid)
        with pytest.raises(NotFound):
            c.get_session(sid)
