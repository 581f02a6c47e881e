#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of proto/memoryd/v1/memoryd.proto into the SDK
# (sdk/memoryd_sdk/_proto/), so the SDK ships them and needs no torch and no protoc.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: sdk/memoryd_sdk/_proto)
# Needs grpcio-tools pinned to the same version as grpcio (generated code checks it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/sdk/memoryd_sdk/_proto}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"
"$python" -m grpc_tools.protoc \
  -I "$root/proto/memoryd/v1" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/memoryd/v1/memoryd.proto"
# protoc writes a top-level import; the stubs live inside a package.
sed -i 's/^import memoryd_pb2 as memoryd__pb2$/from . import memoryd_pb2 as memoryd__pb2/' "$out/memoryd_pb2_grpc.py"
[ -f "$out/__init__.py" ] || printf '"""Generated gRPC stubs of memoryd.v1 (scripts/gen_proto.sh); do not edit."""\n' > "$out/__init__.py"
