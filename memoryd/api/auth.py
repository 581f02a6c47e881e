"""Bearer tokens -> tenants.

Tokens come from a YAML/JSON file (a map token -> tenant) and/or the
`auth_tokens` setting (`token=tenant,token=tenant`).  With neither, auth is off
and every caller is tenant `default`.  Tokens are kept only as sha256 digests, so
a memory dump or a log line never shows one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from memoryd.errors import Unauthenticated

TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Matched with fullmatch: `^...$` with `match` let a trailing newline through (memoryd/api/validation.py)."""
DEFAULT_TENANT = "default"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, tokens: dict[str, str]) -> None:
        for tenant in tokens.values():
            if not TENANT_RE.fullmatch(tenant):
                raise ValueError(f"tenant name {tenant!r} must be 1-64 characters from [A-Za-z0-9._-]")
        self._by_digest = {_digest(t): tenant for t, tenant in tokens.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    @classmethod
    def from_settings(cls, tokens_file: Path | None, tokens_spec: str | None) -> Auth:
        tokens: dict[str, str] = {}
        if tokens_file is not None:
            raw = yaml.safe_load(Path(tokens_file).read_text())
            if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
                raise ValueError(f"{tokens_file} must hold a map of token -> tenant (strings)")
            tokens.update(raw)
        for item in (tokens_spec or "").split(","):
            if item.strip():
                token, sep, tenant = item.strip().partition("=")
                if not sep or not token or not tenant:
                    raise ValueError(f"auth_tokens entries look like token=tenant, got {item!r}")
                tokens[token] = tenant
        return cls(tokens)

    def tenant(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant from `authorization: Bearer <token>`, or UNAUTHENTICATED."""
        if not self.enabled:
            return DEFAULT_TENANT
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        tenant = self._by_digest.get(_digest(token.strip()))
        if tenant is None:
            raise Unauthenticated("unknown bearer token")
        return tenant
