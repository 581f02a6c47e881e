"""What `grpcurl` does for the docs' walkthroughs, for machines without it (tests/test_docs_examples.py).

grpcurl is a Go binary that neither Debian nor PyPI packages, so the docs test cannot install it;
when it is not on PATH, the test puts this script there under its name, and the docs' grpcurl
blocks run through it unchanged. It does the part of grpcurl those blocks use, the way grpcurl
does it: `-plaintext`, `-H 'name: value'`, `-d JSON` parsed into the method's request message
by protobuf's JSON mapping (unknown fields are an error, as in grpcurl), the call over a real
channel, each response printed as JSON (64-bit numbers as strings), and on an error
`ERROR:` with the code and message on stderr and a non-zero exit. Methods of
memoryd.v1.MemoryService only (grpcurl asks reflection for them; the stubs are the same file).
"""

from __future__ import annotations

import sys

import grpc
from google.protobuf import json_format
from memoryd_sdk.proto import memoryd_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]


def main(argv: list[str]) -> int:
    data, headers, rest = "{}", [], []
    it = iter(argv)
    for arg in it:
        if arg == "-plaintext":
            continue
        if arg == "-d":
            data = next(it)
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers.append((name.strip().lower(), value.strip()))
        elif arg.startswith("-"):
            print(f"grpcurl stand-in: flag {arg} is not supported", file=sys.stderr)
            return 2
        else:
            rest.append(arg)
    if len(rest) != 2:
        usage = "usage: grpcurl -plaintext [-H 'k: v'] [-d JSON] HOST:PORT memoryd.v1.MemoryService/METHOD"
        print(usage, file=sys.stderr)
        return 2
    address, target = rest
    service, _, name = target.replace("/", ".").rpartition(".")
    if service != SERVICE.full_name or name not in SERVICE.methods_by_name:
        print(f"ERROR: service or method {target!r} not found", file=sys.stderr)
        return 1
    method = SERVICE.methods_by_name[name]
    request_cls, response_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
    request = json_format.Parse(data, request_cls())
    with grpc.insecure_channel(address) as channel:
        path = f"/{SERVICE.full_name}/{name}"
        ser, de = request_cls.SerializeToString, response_cls.FromString
        try:
            if method.server_streaming:
                answers = list(channel.unary_stream(path, ser, de)(request, metadata=headers, timeout=300))
            else:
                answers = [channel.unary_unary(path, ser, de)(request, metadata=headers, timeout=300)]
        except grpc.RpcError as e:
            code = e.code().name.title().replace("_", "")
            print(f"ERROR:\n  Code: {code}\n  Message: {e.details()}", file=sys.stderr)
            return 1
    for answer in answers:
        print(json_format.MessageToJson(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
