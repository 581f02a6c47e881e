"""`memoryd sessions ls|show|rm|export|import|recall`, `memoryd chat`, `memoryd http`, `memoryd mcp`: for people.

All run against a running daemon.  They use the SDK only (no torch is imported), so they start fast and work from any
machine that can reach the daemon.  Common flags: `--daemon host:port` (env
`MEMORYD_DAEMON`), `--token` (env `MEMORYD_TOKEN`), `--tls-ca cert.pem`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime
from typing import Any

from memoryd_sdk import MemoryClient, MemorydError, Session
from memoryd_sdk.chat import ServerTemplate

DEFAULT_DAEMON = "127.0.0.1:50051"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The client subcommands, added to `memoryd`'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--daemon", default=os.environ.get("MEMORYD_DAEMON", DEFAULT_DAEMON), help="host:port")
    common.add_argument("--token", default=os.environ.get("MEMORYD_TOKEN"), help="bearer token (auth on)")
    common.add_argument("--tls-ca", default=None, help="PEM root certificate (TLS on)")

    s = sub.add_parser("sessions", help="list, show, delete, export and import sessions")
    ss = s.add_subparsers(dest="action", required=True)
    ss.add_parser("ls", parents=[common], help="every session of your tenant")
    p = ss.add_parser("show", parents=[common], help="one session's offset, state, times, metadata")
    p.add_argument("session")
    p = ss.add_parser("rm", parents=[common], help="delete sessions")
    p.add_argument("session", nargs="+")
    p = ss.add_parser("export", parents=[common], help="write a session to a file ('-': stdout)")
    p.add_argument("session")
    p.add_argument("file")
    p = ss.add_parser("import", parents=[common], help="create a session from an export ('-': stdin)")
    p.add_argument("file")
    p.add_argument("--id", default=None, help="session id to create (default: the exported one)")
    p = ss.add_parser("recall", parents=[common], help="the spans of a session's history most relevant to a query")
    p.add_argument("session")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=8, help="how many spans (default 8)")
    p.add_argument("--json", action="store_true", help="one JSON object per span instead of text")

    c = sub.add_parser("chat", parents=[common], help="chat in the terminal; the conversation is a session")
    c.add_argument("session", nargs="?", help="session to continue or create (default: a new one)")
    c.add_argument("--system", default=None, help="system prompt, for a new or empty session")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--seed", type=int, default=None)

    h = sub.add_parser("http", help="the OpenAI-compatible HTTP gateway alone, in front of a daemon")
    h.add_argument("--daemon", default=os.environ.get("MEMORYD_DAEMON", DEFAULT_DAEMON), help="gRPC host:port")
    h.add_argument("--listen", default="127.0.0.1:8080", help="HTTP host:port")
    h.add_argument("--tls-ca", default=None, help="PEM root certificate of the daemon (TLS on)")

    m = sub.add_parser(
        "mcp",
        parents=[common],
        help="an MCP server (tools remember / recall / ask / sessions) in front of a daemon; stdio by default",
    )
    m.add_argument("--listen", default=None, help="serve streamable HTTP on host:port instead of stdio (path /mcp)")


def run(args: argparse.Namespace) -> int:
    if args.cmd == "mcp":
        return run_mcp(args)
    if args.cmd == "http":
        from memoryd.api.openai_http import run_standalone

        try:
            asyncio.run(run_standalone(args.listen, args.daemon, args.tls_ca))
        except KeyboardInterrupt:
            return 130
        return 0
    try:
        with MemoryClient(args.daemon, token=args.token, tls=args.tls_ca, timeout=30) as client:
            if args.cmd == "chat":
                return chat(client, args)
            return SESSIONS[args.action](client, args)
    except MemorydError as e:
        print(f"memoryd: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"memoryd: {e}", file=sys.stderr)
        return 1


def run_mcp(args: argparse.Namespace) -> int:
    """`memoryd mcp`: the MCP server (memoryd/api/mcp.py); needs the `mcp` extra."""
    try:
        from memoryd.api.mcp import Daemon, serve_http, serve_stdio
    except ImportError as e:
        print(f'memoryd mcp needs the MCP SDK: pip install "memoryd[mcp]" ({e})', file=sys.stderr)
        return 1
    daemon = Daemon(args.daemon, args.token, args.tls_ca)
    try:
        asyncio.run(serve_http(daemon, args.listen) if args.listen else serve_stdio(daemon))
    except KeyboardInterrupt:
        return 130
    return 0


# -- sessions -------------------------------------------------------------------------------------


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def ls(client: MemoryClient, args: argparse.Namespace) -> int:
    """One row a session: HOT is its state in the daemon's memory ("-" while not loaded), STORED its bytes in
    Redis (newest snapshot + token log), which a session has whether or not it is loaded."""
    rows = [("SESSION", "OFFSET", "STEPS", "HOT", "STORED", "LAST USED", "METADATA")]
    for s in client.list_sessions():
        meta = ",".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
        hot = _size(s.state_bytes) if s.hot else "-"
        row = (s.session_id, str(s.offset), str(s.steps), hot, _size(s.stored_bytes), _when(s.last_used_at), meta)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show(client: MemoryClient, args: argparse.Namespace) -> int:
    info = asdict(client.get_session(args.session))
    for k in ("created_at", "last_used_at"):
        info[k] = _when(info[k])
    print(json.dumps(info, indent=2))
    return 0


def rm(client: MemoryClient, args: argparse.Namespace) -> int:
    for sid in args.session:
        offset = client.delete_session(sid)
        print(f"deleted {sid} (offset {offset})")
    return 0


def export(client: MemoryClient, args: argparse.Namespace) -> int:
    if args.file == "-":
        h = client.export_session(args.session, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        h = client.export_session(args.session, args.file)
    print(f"exported {h.session_id}: offset {h.offset}, {h.total_bytes} state bytes", file=sys.stderr)
    return 0


def import_(client: MemoryClient, args: argparse.Namespace) -> int:
    src: Any = sys.stdin.buffer if args.file == "-" else args.file
    s = client.import_session(src, args.id)
    print(f"imported {s.id}: offset {s.offset}")
    return 0


def recall(client: MemoryClient, args: argparse.Namespace) -> int:
    """Most relevant first: a header line per span (its log offsets and score), then its text."""
    spans = client.recall(args.session, args.query, args.k)
    for i, sp in enumerate(spans):
        if args.json:
            print(json.dumps(asdict(sp)))
            continue
        print(f"{'' if i == 0 else chr(10)}[{sp.start_offset}, {sp.end_offset})  score {sp.score:.3f}")
        print(printable(sp.text))
    if not spans and not args.json:
        print(f"nothing recalled from {args.session}", file=sys.stderr)
    return 0


SESSIONS = {"ls": ls, "show": show, "rm": rm, "export": export, "import": import_, "recall": recall}


# -- chat -----------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Model text, safe for a terminal (a random-weight test model emits control bytes)."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\N{MIDDLE DOT}" for c in text)


def open_chat(client: MemoryClient, args: argparse.Namespace) -> Session:
    if args.session is None:
        return client.create_session(metadata={"created_by": "memoryd chat"})
    try:
        s = client.session(args.session)
        s.info()
        return s
    except MemorydError as e:
        if e.code.name != "NOT_FOUND":
            raise
        return client.create_session(args.session, metadata={"created_by": "memoryd chat"})


def chat(client: MemoryClient, args: argparse.Namespace) -> int:
    """Read a line, stream the reply, repeat; each turn and its reply are committed together.

    Ctrl-C during a reply cancels it (nothing of that turn is kept); Ctrl-D or /exit ends.
    """
    s = open_chat(client, args)
    fmt = "the model's chat template" if isinstance(s.chat_format(), ServerTemplate) else "plain-text turns"
    print(f"session {s.id} (offset {s.offset}; {fmt}). /exit or Ctrl-D to leave.", flush=True)
    pending = [("system", args.system)] if args.system and s.offset == 0 else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        stream = s.reply_stream(
            [*pending, ("user", line)], max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
        print("bot> ", end="", flush=True)
        try:
            for delta in stream:
                print(printable(delta), end="", flush=True)
        except KeyboardInterrupt:
            stream.cancel()
            print("\n[cancelled: this turn was not kept]", flush=True)
            continue
        pending = []
        print(f"\n[offset {s.offset}]", flush=True)
    print(f"bye; session {s.id} is kept (offset {s.offset}).")
    return 0
