"""Generated gRPC stubs of memoryd.v1 (scripts/gen_proto.sh); do not edit."""
