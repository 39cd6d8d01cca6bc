"""Prometheus metrics of one server: requests, latency, batches, queue depth, stage time.

Each server owns its registry, so several servers in one process (tests) never collide.
Label values come from the served model's name and fixed sets only: a client cannot grow them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's instruments; ``render()`` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgec_inference_requests",
            "Inference requests by model and HTTP status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgec_inference_request_seconds",
            "Inference request latency, receipt to response, in seconds.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edgec_batch_size_rows",
            "Rows per batch the model ran.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "edgec_batch_seconds",
            "Time to run one batch (pre-processing, stages, post-processing), in seconds.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "edgec_queue_depth",
            "Requests waiting for a batch.",
            ["model"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "edgec_stage_seconds",
            "Time one stage of the package took per batch, in seconds.",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, status: int, seconds: float, model: str) -> None:
        """``model`` is the served model's name, or ``"unknown"`` for any other name asked."""
        self.requests.labels(model, str(status)).inc()
        self.latency.labels(model).observe(seconds)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.labels(self.model).observe(rows)
        self.batch_seconds.labels(self.model).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(self.model, stage).observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.labels(self.model).set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
