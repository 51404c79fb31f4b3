"""Prometheus metrics for one server: counters kept as requests finish, gauges read at scrape time."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource

__all__ = ["Metrics", "MetricsResource"]


class _ServiceCollector:
    """Reads the service's live numbers when Prometheus scrapes."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        stats = self.service.stats()
        files, cache = stats["files"], stats["cache"]
        gauges = [
            ("imgserver_queue_depth", "Requests waiting for a worker", stats["queued"]),
            ("imgserver_in_processing", "Images being decoded, transformed or encoded", stats["in_processing"]),
            ("imgserver_workers", "Worker threads", stats["workers"]),
            ("imgserver_open_descriptors", "Files open in the loader", files["open"]),
            ("imgserver_cache_bytes", "Bytes in the result cache", cache["bytes"]),
            ("imgserver_cache_entries", "Entries in the result cache", cache["entries"]),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("imgserver_cache_hits", "Result cache hits", cache["hits"]),
            ("imgserver_cache_misses", "Result cache misses", cache["misses"]),
            ("imgserver_rejected", "Requests refused because the queue was full", stats["rejected"]),
            ("imgserver_coalesced", "Requests that shared another's processing", stats["coalesced"]),
            ("imgserver_file_bytes", "Bytes loaded from files", files["bytes"]),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    """A registry of its own per server (tests run several servers in one process)."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imgserver_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.processing = Histogram(
            "imgserver_processing_seconds", "Time spent decoding, transforming and encoding one image",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry)
        self.registry.register(_ServiceCollector(service))
        service.observe(lambda kind, seconds: self.processing.observe(seconds))

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(resource.Resource):
    """``GET /metrics`` rendered in the reactor thread (it is all in memory)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.endpoint = "metrics"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()
