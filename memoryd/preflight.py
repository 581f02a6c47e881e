"""Start-up checks that run before the model is loaded: each is fast, each failure says what to fix.

Why a separate step: the first start converts the default model (tens of seconds on a
CPU), and a daemon that converts, loads, and only then finds its port taken or no
redis-server on the machine wastes that time and hides the real problem behind it.
Everything `memoryd serve` needs from the machine is checked here first: the listen
addresses are free, the data dir is writable, the checkpoint (or what converting the
default needs) is there, and a Redis can be had (found here, started or reached by
`server.serve` right after, still before the model).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from pathlib import Path

from memoryd.default_model import DEFAULT_NAME
from memoryd.settings import Settings
from memoryd.store.redis_embed import find_redis_server
from model.gguf_source import find_smollm2_gguf


class StartupError(RuntimeError):
    """A precondition of `memoryd serve` that does not hold; the message names the setting and the fix."""


def check_startup(s: Settings) -> None:
    """Raise StartupError (or RedisNotFound) for the first precondition that does not hold."""
    check_bindable("listen", s.listen)
    if s.http_listen:
        check_bindable("http_listen", s.http_listen)
    if s.metrics_port:
        check_bindable("metrics_port", f"{s.metrics_host}:{s.metrics_port}")
    for name in ("tls_cert", "tls_key", "auth_tokens_file"):
        path = getattr(s, name)
        if path is not None and not os.access(path, os.R_OK):
            raise StartupError(f"{name} {path} cannot be read: give a readable file (--{name.replace('_', '-')})")
    needs_dir = s.redis_url is None or s.checkpoint is None
    if needs_dir:
        check_writable(s.data_dir)
    if s.checkpoint is not None:
        if not (Path(s.checkpoint) / "config.json").is_file():
            raise StartupError(
                f"checkpoint {s.checkpoint} is not a checkpoint dir (no config.json): give one made by "
                "`python -m model init/convert`, or leave --checkpoint unset for the default model"
            )
    else:
        check_default_model(s.data_dir)
    if s.redis_url is None:
        find_redis_server()  # RedisNotFound with the fix; the embedded one starts right after this


def check_bindable(name: str, address: str) -> None:
    """`address` (host:port) can be bound now; port 0 always can."""
    host, _, port_s = address.rpartition(":")
    port = int(port_s)
    if port == 0:
        return
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"{name} {address}: the host does not resolve ({e}); give an address of this machine") from e
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as e:
            raise StartupError(
                f"{name} {address}: cannot bind ({e.strerror}); another process (another memoryd?) listens there: "
                f"stop it or choose another --{name.replace('_', '-')} (port 0: any free one)"
            ) from e


def check_writable(data_dir: Path) -> None:
    """The data dir exists (made if need be) and a file can be written in it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".memoryd-write-check-"):
            pass
    except OSError as e:
        raise StartupError(
            f"data_dir {data_dir} is not writable ({e.strerror or e}): the embedded Redis and the default model "
            "live there; choose another with --data-dir"
        ) from e


def check_default_model(data_dir: Path) -> None:
    """Converting the default model needs the [convert] extra; a converted copy needs nothing."""
    if find_smollm2_gguf() is None or (data_dir / "models" / DEFAULT_NAME / "config.json").is_file():
        return  # the random fallback (with its own warning), or already converted
    missing = [m for m in ("gguf", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise StartupError(
            f"the default model is converted on first start, which needs {' and '.join(missing)}: "
            "pip install -e '.[convert]' (or give --checkpoint DIR)"
        )
