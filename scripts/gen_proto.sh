#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of proto/memoryd/v1/memoryd.proto into the SDK
# (sdk/memoryd_sdk/proto/), so the SDK ships them and needs no torch and no protoc.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: sdk/memoryd_sdk/proto)
# Needs grpcio-tools pinned to the same version as grpcio (generated code checks it).
#
# The include root is proto/, so the file is registered under its import path
# `memoryd/v1/memoryd.proto` (what reflection clients such as grpcurl ask for).
# protoc then writes the stubs as the module memoryd.v1.memoryd_pb2; the SDK ships
# them flat, as the package memoryd_sdk.proto, so they are moved there and their
# imports and module names point at that package (nothing else changes).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/sdk/memoryd_sdk/proto}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m grpc_tools.protoc \
  -I "$root/proto" \
  --python_out="$work" --pyi_out="$work" --grpc_python_out="$work" \
  "$root/proto/memoryd/v1/memoryd.proto"
for f in memoryd_pb2.py memoryd_pb2.pyi memoryd_pb2_grpc.py; do
  sed -e 's/^from memoryd\.v1 import memoryd_pb2 as memoryd_dot_v1_dot_memoryd__pb2$/from . import memoryd_pb2 as memoryd_dot_v1_dot_memoryd__pb2/' \
      -e "s/'memoryd\.v1\.memoryd_pb2'/'memoryd_sdk.proto.memoryd_pb2'/g" \
      "$work/memoryd/v1/$f" > "$out/$f"
done
if grep -n 'memoryd\.v1 import\|memoryd\.v1\.memoryd_pb2' "$out"/memoryd_pb2*.py*; then
  echo "gen_proto.sh: a module path of the protoc output was not rewritten (above)" >&2
  exit 1
fi
[ -f "$out/__init__.py" ] || printf '"""Generated gRPC stubs of memoryd.v1 (scripts/gen_proto.sh); do not edit."""\n' > "$out/__init__.py"
