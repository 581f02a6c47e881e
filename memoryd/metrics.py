"""Prometheus metrics (served on `--metrics-port`), named after what the spec promises to show."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from memoryd.allocator import rss_bytes

CALLS = Counter("memoryd_calls_total", "gRPC calls by method and status code", ["method", "code"])
CALL_SECONDS = Histogram(
    "memoryd_call_seconds",
    "gRPC call latency",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS_READ = Counter("memoryd_tokens_read_total", "tokens read by the model (appends and committed generations)")
TOKENS_GENERATED = Counter("memoryd_tokens_generated_total", "tokens sampled by generate")
TTT_STEPS = Counter("memoryd_ttt_steps_total", "test-time training steps (full mini-batches)")
SESSIONS_HOT = Gauge("memoryd_sessions_hot", "sessions whose state is on the device")
SESSIONS_STORED = Gauge("memoryd_sessions_stored", "sessions stored in Redis (all tenants)")
HOT_BYTES = Gauge("memoryd_hot_state_bytes", "bytes of session state on the device")
CHARGED_BYTES = Gauge(
    "memoryd_budget_charged_bytes",
    "bytes the memory budget counts: hot states, the working copies of calls in progress, loads under way",
)
SESSIONS_PINNED = Gauge("memoryd_sessions_pinned", "sessions a call is working on or waiting for (never evicted)")
RSS_BYTES = Gauge("memoryd_process_rss_bytes", "resident set size of the daemon process (/proc/self/statm)")
RSS_BYTES.set_function(rss_bytes)
REFUSED = Counter(
    "memoryd_refused_total", "calls refused early with RESOURCE_EXHAUSTED (queue limit, or deadline)", ["reason"]
)
BACKLOG_TOKENS = Gauge("memoryd_backlog_tokens", "tokens of model work the calls in progress still bring")
DROPPED = Counter("memoryd_dropped_work_total", "queued work dropped because its caller left or its deadline passed")
SNAPSHOTS = Counter("memoryd_snapshots_total", "snapshots written", ["reason"])
SNAPSHOT_BYTES = Counter("memoryd_snapshot_bytes_total", "bytes of snapshots written to Redis")
SNAPSHOT_SECONDS = Histogram("memoryd_snapshot_seconds", "time to serialize, write and publish a snapshot")
LOADS = Counter("memoryd_session_loads_total", "sessions brought back from Redis (snapshot + log replay)")
LOAD_SECONDS = Histogram(
    "memoryd_session_load_seconds",
    "time to load a session: Redis reads, the wait for the compute lane, snapshot deserialize and replay",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REPLAYED_TOKENS = Counter("memoryd_replayed_tokens_total", "log tokens replayed while loading sessions")
EVICTIONS = Counter("memoryd_evictions_total", "hot sessions written out and dropped for the byte budget")
FORWARDED = Counter("memoryd_forwarded_calls_total", "calls forwarded to the daemon holding their session", ["method"])
REDIS_ERRORS = Counter("memoryd_redis_errors_total", "Redis calls that failed (reported as UNAVAILABLE)")


def serve_metrics(port: int, host: str) -> int:
    """Start the HTTP exporter in a daemon thread; returns the bound port (0: off)."""
    if port == 0:
        return 0
    server, _thread = start_http_server(port, addr=host)
    return server.server_port


ENGINE_TICKS = Counter("memoryd_engine_ticks_total", "engine ticks (one plan run by a lane)", ["lane"])
ENGINE_TICK_SECONDS = Histogram(
    "memoryd_engine_tick_seconds",
    "time a lane (decode: the batched forward; compute: solo work, test-time steps) spends on one plan",
    ["lane"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ENGINE_DECODE_ROWS = Histogram(
    "memoryd_engine_decode_rows", "sessions decoded together in one batched forward", buckets=(1, 2, 4, 8, 16, 32, 64)
)
DECODE_POOL_BYTES = Gauge(
    "memoryd_decode_pool_bytes",
    "bytes of the decode lane's copy of its rows' keys and values (model/pool.py; outside the memory budget)",
)
ENGINE_TICK_TOKENS = Histogram(
    "memoryd_engine_tick_tokens", "tokens of model work in one lane's plan", buckets=(1, 8, 32, 128, 512, 2048, 8192)
)
ENGINE_WAITING = Gauge("memoryd_engine_waiting", "work items queued for the engine")

RECALL_SECONDS = Histogram(
    "memoryd_recall_seconds",
    "time to find a session's recalled spans: a Recall call, or a generation's retrieval before its first token",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
RECALLED_TOKENS = Counter(
    "memoryd_recalled_tokens_total", "tokens of recalled context placed before generation prompts (never logged)"
)
