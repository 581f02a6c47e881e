"""`pip install ./sdk` into a clean venv brings grpcio and protobuf and no torch, and
examples/agent_loop.py runs from that venv against a real daemon (issue 4, "Must show" 2).

This is the CI check of the SDK's packaging: it builds a fresh venv with `python -m venv`
and installs the SDK with the ambient pip configuration (here the local wheel cache; in CI,
the index).  The SDK folder is copied first, so the build's leftovers (build/, *.egg-info)
never land in the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from memoryd_sdk import MemoryClient, NotFound

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS  # noqa: E402
from service_fixtures import ROOT, Daemon  # noqa: E402

pytest_plugins = ["sdk_fixtures"]


def clean_env() -> dict[str, str]:
    """The environment without anything that would leak the repo's packages into the new venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sdk-install")
    src = tmp / "sdk"
    shutil.copytree(ROOT / "sdk", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "./sdk"],
        cwd=tmp,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def run_in(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120
    )


def test_clean_venv_has_the_sdk_and_no_torch(sdk_venv: Path, tmp_path: Path) -> None:
    listing = run_in(sdk_venv, "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0] for line in listing.split()}
    assert {"memoryd-sdk", "grpcio", "protobuf"} <= names
    assert "torch" not in names and "memoryd" not in names, names
    no_torch = run_in(sdk_venv, "-c", "import torch", cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    probe = "import sys, memoryd_sdk, memoryd_sdk.aio; assert 'torch' not in sys.modules; print(memoryd_sdk.__file__)"
    ok = run_in(sdk_venv, "-c", probe, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert str(sdk_venv) in ok.stdout  # the installed copy, not the checkout


def test_example_runs_from_the_clean_venv(sdk_venv: Path, sdk_daemon: Daemon, tmp_path: Path) -> None:
    example = ROOT / "examples" / "agent_loop.py"
    out = run_in(
        sdk_venv,
        str(example),
        "--target",
        sdk_daemon.address,
        "--token",
        TOKENS["alice"],
        "--max-tokens",
        "8",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "streamed" in out.stdout and out.stdout.count("tried") == 2 and "next step" in out.stdout
    sid = re.search(r"^session (\w+)$", out.stdout, re.M)
    assert sid, out.stdout
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c, pytest.raises(NotFound):
        c.get_session(sid.group(1))  # the example cleans up after itself
    bad = run_in(sdk_venv, str(example), "--target", sdk_daemon.address, cwd=tmp_path)  # no token
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr
