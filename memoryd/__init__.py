"""memoryd: the gRPC daemon that serves TTT-E2E memory sessions, with state in Redis.

Plumbing around `model/` (spec: shape.md): validation and status codes at the edge
(`service`), ordering and memory budgets in the middle (`sessions`), bytes at the
bottom (`store`).
"""
