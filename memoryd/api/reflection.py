"""Server reflection as both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection (1.85) implements only v1alpha, while current clients (grpcurl,
Postman, grpcui) ask v1 first. The two protocols are the same messages with the same
field numbers under another package name, so the same servicer answers both: its
v1alpha messages are, byte for byte, the v1 messages a v1 client expects.

The v1 descriptors are made from the v1alpha ones by renaming the package (rather than
vendoring reflection.proto), and added to the default pool, so `list` names the v1
service and a client can describe it like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def _rename(fdp: descriptor_pb2.FileDescriptorProto, old: str, new: str) -> None:
    """Point every type reference of the file from package `old` to package `new`."""

    def fix(msg: Any, field: str) -> None:  # only set fields are touched (descriptor.proto is proto2)
        name = getattr(msg, field)
        if name.startswith(f".{old}."):
            setattr(msg, field, f".{new}." + name[len(old) + 2 :])

    def walk(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            for f in m.field:
                fix(f, "type_name")
            walk(m.nested_type)

    walk(fdp.message_type)
    for svc in fdp.service:
        for meth in svc.method:
            fix(meth, "input_type")
            fix(meth, "output_type")


def v1_file(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """`grpc/reflection/v1/reflection.proto` in the pool (added once, from the v1alpha file)."""
    pool = pool or descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old = fdp.package
    fdp.name, fdp.package = V1_FILE, V1_PACKAGE
    fdp.ClearField("options")  # v1alpha's options (deprecated, java package) are not v1's
    _rename(fdp, old, V1_PACKAGE)
    pool.Add(fdp)
    return pool.FindFileByName(V1_FILE)


def v1_messages() -> tuple[type, type]:
    """The v1 request and response classes (for clients and tests)."""
    f = v1_file()
    return (
        message_factory.GetMessageClass(f.message_types_by_name["ServerReflectionRequest"]),
        message_factory.GetMessageClass(f.message_types_by_name["ServerReflectionResponse"]),
    )


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection, v1 and v1alpha, listing `service_names` and both reflection services."""
    v1_file()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)  # v1alpha, as grpcio-reflection ships it
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
