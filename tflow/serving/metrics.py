"""The server's Prometheus metrics, in a registry of its own (two servers in one process never clash)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# `channel` of a request rejected before its model was known (bad JSON, no API key).
UNKNOWN = "unknown"


class Metrics:
    """Requests, errors, batch sizes, queue wait and tokens per second, per channel."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tflow_requests", "Chat completion requests answered, by channel and HTTP status",
                                ["channel", "status"], registry=r)
        self.errors = Counter("tflow_request_errors", "Requests answered with an error, by channel and error code",
                              ["channel", "code"], registry=r)
        self.batch_size = Histogram("tflow_batch_size", "Rows (choices) per batch", ["channel"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_wait = Histogram("tflow_queue_wait_seconds", "Seconds a request waited for its batch to start",
                                    ["channel"], registry=r)
        self.generated = Counter("tflow_generated_tokens", "Tokens the receiver generated", ["channel"], registry=r)
        self.tokens_per_second = Gauge("tflow_tokens_per_second",
                                       "Receiver tokens per second over the last batch (all its rows)",
                                       ["channel"], registry=r)
        self.cancelled = Counter("tflow_cancelled_rows", "Rows stopped early because their client went away",
                                 ["channel"], registry=r)
        self.queue_depth = Gauge("tflow_queue_depth", "Requests waiting for a batch", registry=r)

    def answered(self, channel: str, status: int, code: str | None = None) -> None:
        self.requests.labels(channel, str(status)).inc()
        if status >= 400:
            self.errors.labels(channel, code or str(status)).inc()

    def batch(self, channel: str, rows: int, tokens: int, seconds: float, cancelled: int) -> None:
        self.batch_size.labels(channel).observe(rows)
        self.generated.labels(channel).inc(tokens)
        self.tokens_per_second.labels(channel).set(tokens / seconds if seconds > 0 else 0.0)
        if cancelled:
            self.cancelled.labels(channel).inc(cancelled)

    def render(self) -> bytes:
        return generate_latest(self.registry)
