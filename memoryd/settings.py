"""The daemon's configuration: CLI flags > `MEMORYD_*` env vars > config file > defaults.

One pydantic-settings model, so every knob is validated in one place and the
error names the knob.  The config file (YAML or JSON, `--config` or
`MEMORYD_CONFIG`) holds the same keys as the flags, with underscores.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from memoryd.store.redis_client import check_url

_PROCESS_NONCE = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""Tells apart daemons that listen on port 0 on one host (pid alone repeats across containers)."""

_config_file: ContextVar[str | None] = ContextVar("memoryd_config_file", default=None)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value: Any) -> int:
    """`"512MiB"`, `"2GB"` or an int: a byte count (so budgets read like people write them)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a byte size (examples: 1048576, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "memoryd"


class Settings(BaseSettings):
    """Every knob of `memoryd serve`."""

    model_config = SettingsConfigDict(env_prefix="MEMORYD_", extra="forbid", validate_default=True)

    listen: str = Field("127.0.0.1:50051", description="gRPC listen address host:port (port 0: any free port)")
    http_listen: str | None = Field(
        None, description="OpenAI-compatible HTTP endpoint host:port (off when unset; memoryd/api/openai_http.py)"
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus HTTP port (0: off)")
    metrics_host: str = Field("127.0.0.1", description="Prometheus HTTP bind address")
    checkpoint: Path | None = Field(
        None, description="model checkpoint dir (default: SmolLM2-135M-Instruct, converted once into data_dir)"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the served weights (fast weights and logits stay float32); bfloat16 halves the bytes "
        "a decode reads on a GPU. It is part of the model digest: sessions are bound to it",
    )
    redis_url: str | None = Field(
        None,
        description="redis://host:port/db, or redis+cluster://host:port,host:port for a Redis Cluster "
        "(default: an embedded redis-server)",
    )
    redis_wait_replicas: int = Field(
        0, ge=0, description="acknowledge a write only once this many replicas have it (Redis WAIT; 0: off)"
    )
    redis_wait_timeout: float = Field(
        1.0, gt=0, description="seconds a write waits for redis_wait_replicas before failing as UNAVAILABLE"
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="embedded Redis data and default model")
    auth_tokens_file: Path | None = Field(None, description="YAML/JSON map token -> tenant (auth on when set)")
    auth_tokens: str | None = Field(None, description="token=tenant,token=tenant (auth on when set)")
    tls_cert: Path | None = Field(None, description="PEM certificate chain (TLS on when set, with tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key")
    memory_budget: int = Field(2 * 1024**3, gt=0, description="bytes of hot session state kept on the device")
    snapshot_interval: int = Field(16, ge=1, description="write a snapshot every N test-time steps (mini-batches)")
    ttl_seconds: int = Field(7 * 86400, ge=0, description="idle sessions expire after this (0: never)")
    lease_seconds: float = Field(
        30.0, gt=0, description="a daemon's hold on a session, renewed while it is hot or being loaded"
    )
    instance_id: str = Field(
        "", description="this daemon's name in leases (default: host:listen, plus a per-process suffix for port 0)"
    )
    advertise_address: str | None = Field(
        None,
        description="host:port other daemons and clients reach this daemon at, published with its leases "
        "(default: the listen host and the port actually bound)",
    )
    max_append_tokens: int = Field(65536, ge=1, description="tokens per append message")
    max_generate_tokens: int = Field(4096, ge=1, description="max_tokens ceiling of generate")
    max_sessions_per_tenant: int = Field(0, ge=0, description="0: unlimited")
    max_message_bytes: int = Field(
        16 * 1024**2, ge=64 * 1024, description="largest gRPC message accepted (at least 64KiB: room for any answer)"
    )
    max_import_bytes: int = Field(4 * 1024**3, ge=1, description="largest session export accepted by import")
    snapshot_chunk_bytes: int = Field(4 * 1024**2, ge=1024, description="snapshot chunk size in Redis")
    tick_tokens: int = Field(
        512,
        ge=1,
        description="tokens of solo model work per compute-lane run (append pieces, replays, test-time steps); long "
        "appends are cut at mini-batch boundaries to fit, so one long append holds others' solo work back by at most "
        "one run (decoding runs on its own lane meanwhile)",
    )
    max_queued_tokens: int = Field(
        0,
        ge=0,
        description="refuse a call at once with RESOURCE_EXHAUSTED (and a retry hint) when the tokens of model work "
        "queued ahead of it (appends, prompts, replays of sessions to load) would pass this (0: no limit; calls are "
        "still refused when the work ahead would outlast their deadline)",
    )
    batch_sessions: int = Field(64, ge=1, description="sessions decoded together in one batched forward")
    packed_decode: bool = Field(
        True,
        description="on a CPU, decode multiplies its sessions' rows by the static weights through oneDNN's packed "
        "copies of them, made at start, and by the fast weights on oneDNN (model/packed.py): 244 -> 208 ms a "
        "16-session forward of the default model, for 464 MB more resident memory; false saves the memory",
    )
    decode_pool_bytes: int = Field(
        1 << 30,  # model.pool.DEFAULT_MAX_BYTES (this module does not import torch)
        ge=0,
        description="bytes the decode lane may keep of a second copy of the decoding sessions' keys and values, so "
        "that a batched forward attends in one call per layer (model/pool.py; 2-10 percent off a 16-session forward "
        "of the default model on a CPU, one kernel a layer instead of one a session on a GPU; about 46 KB a token of "
        "cache for the default model, so 16 sessions at a full window take 0.8 GB); outside the memory budget; a "
        "batch's sessions it has no room for attend one by one in the same forward; 0: never",
    )
    malloc_arena_max: int = Field(
        2,
        ge=0,
        description="glibc malloc arenas (mallopt M_ARENA_MAX; 0: glibc's default, 8 per core): fewer arenas hold "
        "less freed memory; 2 measured lower RSS at the same throughput (docs/service.md, Under load)",
    )
    malloc_mmap_threshold: int = Field(
        0,
        ge=0,
        description="allocations at least this big are mmapped and go back to the system when freed (mallopt "
        "M_MMAP_THRESHOLD; 0: glibc's default, which rises after the first large free up to 32MiB). 1MiB cut RSS "
        "a little but made the default model's replay 1.5x slower (docs/service.md, Under load)",
    )
    torch_threads: int = Field(
        1, ge=0, description="torch intra-op threads (0: torch's default; more than 1 only on a dedicated machine)"
    )
    redis_timeout: float = Field(5.0, gt=0, description="seconds before a Redis call counts as failed")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight calls get on SIGTERM")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")

    @field_validator(
        "memory_budget",
        "max_message_bytes",
        "max_import_bytes",
        "snapshot_chunk_bytes",
        "malloc_mmap_threshold",
        "decode_pool_bytes",
        mode="before",
    )
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)

    @field_validator("listen", "http_listen", "advertise_address")
    @classmethod
    def _listen(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{info.field_name} must be host:port (e.g. 127.0.0.1:50051), got {v!r}")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @model_validator(mode="after")
    def _wait_fits(self) -> Settings:
        if self.redis_wait_replicas and self.redis_wait_timeout >= self.redis_timeout:
            raise ValueError(
                f"redis_wait_timeout ({self.redis_wait_timeout}s) must be below redis_timeout ({self.redis_timeout}s), "
                "or every write waiting for replicas would count as a failed Redis call"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {v!r}")
        return v.upper()

    @property
    def daemon_id(self) -> str:
        """This process's name in leases: unique among live daemons, and stable across restarts
        where it can be.

        With a fixed port, `host:listen` (one process per port: the server binds without
        SO_REUSEPORT), so a restarted daemon takes back its own leases at once. With port 0
        every start listens elsewhere, so nothing is gained by reuse and two daemons on one
        host would share the name: a per-process suffix tells them apart.
        """
        if self.instance_id:
            return self.instance_id
        name = f"{socket.gethostname()}:{self.listen}"
        return f"{name}#{_PROCESS_NONCE}" if self.listen.endswith(":0") else name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get() or os.environ.get("MEMORYD_CONFIG")
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))  # YAML reads JSON too
        return tuple(sources)


def load_settings(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> Settings:
    """Settings from flags (`overrides`), env and the optional file, in that order of precedence."""
    token = _config_file.set(config_file)
    try:
        return Settings(**(overrides or {}))
    finally:
        _config_file.reset(token)
