"""memoryd SDK: a Python client of the memoryd gRPC service (importable without torch).

The generated stubs live in `memoryd_sdk._proto` (regenerate with scripts/gen_proto.sh).
"""
