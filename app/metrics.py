"""Prometheus metrics on a private CollectorRegistry per app (several apps in one process never collide).

With `workers > 1` each worker process keeps its own counters; scrape them per process or run one
worker per container. Each replica names itself in `target_info{replica="..."}` (setting replica_name,
default HOST:PORT), so per-replica series can be told apart behind a load balancer.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica: str | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        if replica:
            r.set_target_info({"replica": replica})
        self.requests = Counter(
            "stpm_http_requests", "HTTP requests by route template, method and status", ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "stpm_http_request_duration_seconds", "HTTP request latency (server side)", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("stpm_http_requests_in_flight", "Requests being served", registry=r)
        self.images = Counter("stpm_images_scored", "Images scored", ["model"], registry=r)
        self.anomalies = Counter("stpm_anomalies_flagged", "Images flagged as anomalous", ["model"], registry=r)
        self.scores = Histogram(
            "stpm_anomaly_score", "Normalised anomaly score (0.5 = threshold)", ["model"], buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "stpm_inference_duration_seconds", "ONNX Runtime batch latency (decode excluded)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "stpm_batch_images", "Images per inference batch (micro-batching)", ["model"], buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.rejected = Counter("stpm_rejected_inputs", "Uploads refused, by reason", ["reason"], registry=r)
        self.model_loads = Counter(
            "stpm_model_loads", "Model load events by result (ok, error, evicted, unloaded)", ["model", "result"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "stpm_model_load_duration_seconds", "Time to load and warm up a model", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge("stpm_models_loaded", "Scorers held in memory", registry=r)

    def observe_result(self, model: str, score: float, is_anomaly: bool) -> None:
        self.images.labels(model).inc()
        self.scores.labels(model).observe(score)
        if is_anomaly:
            self.anomalies.labels(model).inc()

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export `stpm_train_jobs{state}` (queue depth and friends), read from the job store on scrape."""
        self.registry.register(_JobStates(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobStates:
    """Collector: training jobs per state, as the (shared) job store sees them at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def describe(self):
        return [GaugeMetricFamily("stpm_train_jobs", "Training jobs by state (shared job store)", labels=["state"])]

    def collect(self):
        g = GaugeMetricFamily("stpm_train_jobs", "Training jobs by state (shared job store)", labels=["state"])
        try:
            counts = self.counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is down
            counts = {}
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
