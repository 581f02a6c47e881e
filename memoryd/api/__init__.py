"""The edges: the gRPC service and the OpenAI-compatible HTTP gateway (validation, status codes)."""
