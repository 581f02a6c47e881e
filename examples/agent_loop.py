"""A small agent on memoryd: stream tool observations into a session, fork it to try two actions,
then ask it for the next step.

    memoryd serve &                       # no flags: 127.0.0.1:50051, embedded Redis, default model
    python examples/agent_loop.py         # or --target host:port [--token T] [--tls-ca cert.pem]

Needs only the SDK (`pip install ./sdk`: grpcio + protobuf, no torch).  The daemon's default
model is SmolLM2-135M-Instruct (converted on its first start): a small model, so expect short,
plausible rather than wise answers.  With a checkpoint that has no chat template (a random
preset in the tests) the turns use the SDK's plain-text template and the text is noise: the
point is the shape of the loop (what goes where, what is kept, what is thrown away).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from memoryd_sdk import MemoryClient, MemorydError, Session

# What the agent's tools "returned" (a real agent would run them and stream their output).
OBSERVATIONS = {
    "check_disk": ["Filesystem  Size  Used  Avail  Use%\n", "/dev/sda1   50G   46G   4.0G   92%\n"],
    "tail_logs": [
        "12:01 api: request timeout after 30s\n",
        "12:02 api: request timeout after 30s\n",
        "12:02 db: could not extend file: No space left on device\n",
    ],
}
ACTIONS = ["delete old log archives in /var/log/archive", "restart the api service"]


def observation_turns() -> Iterator[tuple[str, str]]:
    """Each tool result as a `tool` turn, produced as the tool output arrives (line by line)."""
    for tool, lines in OBSERVATIONS.items():
        for line in lines:
            yield ("tool", f"[{tool}] {line.rstrip()}")


def printable(text: str) -> str:
    """Model text, safe to print (a random-weight model emits control bytes)."""
    return "".join(c if c.isprintable() else "\N{MIDDLE DOT}" for c in text)


def try_action(session: Session, action: str, max_tokens: int, seed: int) -> str:
    """Fork the session, play the action in the fork, and ask what the agent expects; the fork is then deleted."""
    with session.fork(metadata={"trying": action}, temporary=True) as trial:
        trial.add_message("assistant", f"Action: {action}")
        outcome = trial.chat("What outcome do you expect?", max_tokens=max_tokens, seed=seed)  # the fork's own memory
        print(f"  fork {trial.id[:8]} (offset {trial.offset}) tried {action!r}")
        print(f"    -> {printable(outcome.text)!r}")
        return outcome.text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="memoryd address host:port")
    p.add_argument("--token", default=None, help="bearer token, when the daemon has auth on")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate, when the daemon has TLS on")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the session (default: delete it at the end)")
    args = p.parse_args(argv)

    try:
        with MemoryClient(args.target, token=args.token, tls=args.tls_ca) as client:
            session = client.create_session(metadata={"agent": "agent_loop"})
            print(f"session {session.id}")
            session.add_message("system", "You are an on-call agent. Observe, try actions, pick the next step.")

            # 1. Tool output streams in as it is produced: one client-streaming call, each line
            #    one append with its own append id (a retry after a dropped connection lands once).
            r = session.append_stream(observation_turns())  # turns in the model's chat format
            print(f"streamed {r.tokens} tokens of observations; offset {r.offset}, steps {r.steps}")

            # 2. Try two actions on forks: each fork shares the session's state, nothing is copied,
            #    and what happens in a fork does not leak into the session.
            for i, action in enumerate(ACTIONS):
                try_action(session, action, args.max_tokens, args.seed + i)
            assert session.info().offset == session.offset, "a fork changed the session"

            # 3. Ask the session itself for the next step; the question and answer become memory.
            reply = session.chat("Given the observations, what is the next step?", max_tokens=args.max_tokens)
            print(f"next step ({reply.finish_reason.name.lower()}): {printable(reply.text)!r}")
            print(f"session offset {reply.offset}")
            if not args.keep:
                session.delete()
    except MemorydError as e:
        print(f"agent_loop: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
