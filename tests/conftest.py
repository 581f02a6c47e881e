"""Shared test fixtures.  Model fixtures are tiny configs so the suite runs on 2 CPU cores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Test helpers (e.g. naive_ttt) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

pytest.register_assert_rewrite("default_fixtures")  # test files import it before loading it as a plugin

from cluster_fixtures import redis_cluster  # noqa: E402, F401 (here, so the whole run shares one cluster)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
