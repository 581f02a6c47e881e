"""Channels and per-call metadata: one channel per client, shared by all its sessions.

A gRPC channel is a connection pool with its own reconnect logic; making one per call
(or per session) would pay a TCP + HTTP/2 (+ TLS) handshake each time.  The bearer
token travels as per-call metadata rather than call credentials, because grpc refuses
call credentials on a plaintext channel and memoryd's default is plaintext on localhost.
"""

from __future__ import annotations

import os
from typing import Any

import grpc

TLS = bool | bytes | str | os.PathLike | grpc.ChannelCredentials | None
"""`None`/`False`: plaintext.  `True`: TLS with the system's roots.  `bytes` or a path:
TLS trusting that PEM root certificate (a self-signed daemon).  `grpc.ChannelCredentials`: as given."""

# Reconnect quickly after a dropped connection (grpc's default first wait is 1 s), and
# accept messages as large as the daemon's default limit (exports, long appends).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)


def credentials(tls: TLS) -> grpc.ChannelCredentials | None:
    """Channel credentials for the `tls` argument (None: plaintext)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    with open(tls, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def sync_channel(target: str, tls: TLS, options: tuple[tuple[str, Any], ...] = ()) -> grpc.Channel:
    creds = credentials(tls)
    opts = list(CHANNEL_OPTIONS) + list(options)
    return grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)


def aio_channel(target: str, tls: TLS, options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    creds = credentials(tls)
    opts = list(CHANNEL_OPTIONS) + list(options)
    return grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <token>` when a token is set."""
    return (("authorization", f"Bearer {token}"),) if token else ()
