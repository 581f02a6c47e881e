"""`memoryd serve [--flag value ...]`: every Settings field is a flag (`--memory-budget 2GiB`).

Also the commands for people against a running daemon (`memoryd_sdk` only, no torch):
`memoryd sessions ls|show|rm|export|import|recall`, `memoryd chat [SESSION]` and `memoryd http`
(the OpenAI-compatible gateway alone); see `memoryd/cli/client.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError

from memoryd.settings import Settings, load_settings
from memoryd.store.redis_embed import RedisNotFound


def build_parser() -> argparse.ArgumentParser:
    from memoryd.cli.client import add_commands

    p = argparse.ArgumentParser(prog="memoryd", description="Long-context memory sessions for AI agents over gRPC.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon (no flags: localhost, embedded Redis, default model)")
    s.add_argument("--config", help="YAML or JSON file with the same keys as these flags (underscores)")
    for name, field in Settings.model_fields.items():
        s.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field.description)
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd != "serve":
        from memoryd.cli.client import run

        return run(args)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = load_settings(overrides, args.config)
    except (ValidationError, ValueError) as e:
        print(f"memoryd: bad configuration: {e}", file=sys.stderr)
        return 2
    from memoryd.server import serve, setup_logging  # torch is imported only once the config is good
    from model import CheckpointError

    setup_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except (RedisNotFound, CheckpointError, OSError, ValueError, RuntimeError) as e:
        # startup problems a person fixes (bad checkpoint, missing TLS file, no redis-server): one line
        print(f"memoryd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
