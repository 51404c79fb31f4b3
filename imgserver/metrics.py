"""Prometheus metrics for one server: counters kept as things happen, gauges read at scrape time.

Besides the service's numbers this has the HTTP layer's connection numbers
(open, refused over the cap, dropped by reason) and a reactor lag monitor
(:class:`LagMonitor`): a ``LoopingCall`` that measures how late the reactor
runs it.  ``/healthz`` reports ``degraded`` while the recent lag is over
:data:`LAG_DEGRADED` seconds.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import task
from twisted.web import resource

__all__ = ["Metrics", "MetricsResource", "LagMonitor", "LAG_DEGRADED", "LAG_INTERVAL", "LAG_WINDOW"]

#: Reactor lag (seconds) over which the server says it is degraded.
LAG_DEGRADED = 0.5
#: How often the lag monitor wakes up, in seconds.
LAG_INTERVAL = 0.1
#: The lag reported is the largest measured over this many seconds.
LAG_WINDOW = 2.0


class LagMonitor:
    """How late the reactor runs a call scheduled every ``interval`` seconds.

    :meth:`current` is the largest lag measured in the last ``window``
    seconds (0 when not running), so one long stall shows for a while rather
    than for one scrape.  Started and stopped by the site (with its ports).
    """

    def __init__(self, reactor: Any, interval: float = LAG_INTERVAL, window: float = LAG_WINDOW) -> None:
        self.reactor = reactor
        self.interval = interval
        self.window = window
        self._loop: task.LoopingCall | None = None
        self._last = 0.0
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self.worst = 0.0  # since start, for the record

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._last = self.reactor.seconds()
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self._samples.clear()

    def _tick(self) -> None:
        now = self.reactor.seconds()
        lag = max(0.0, now - self._last - self.interval)
        self._last = now
        self.worst = max(self.worst, lag)
        samples = self._samples
        samples.append((now, lag))
        while samples and samples[0][0] < now - self.window:
            samples.popleft()

    def current(self) -> float:
        """The largest lag (seconds) measured in the last ``window`` seconds,
        counting the time since the last tick beyond its due time (a reactor
        stalled right now lags too)."""
        if self._loop is None:
            return 0.0
        now = self.reactor.seconds()
        pending = max(0.0, now - self._last - self.interval)
        recent = max((lag for when, lag in self._samples if when >= now - self.window), default=0.0)
        return max(recent, pending)


class _ServiceCollector:
    """Reads the service's live numbers when Prometheus scrapes."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        stats = self.service.stats()
        files, cache = stats.get("files", {}), stats.get("cache", {})
        gauges = [
            ("imgserver_queue_depth", "Requests waiting for a worker", stats.get("queued")),
            ("imgserver_in_processing", "Images being decoded, transformed or encoded", stats.get("in_processing")),
            ("imgserver_workers", "Worker threads", stats.get("workers")),
            ("imgserver_streams", "Originals being streamed", stats.get("streams")),
            ("imgserver_max_streams", "Originals that may be streamed at once", stats.get("max_streams")),
            ("imgserver_memory_in_use_bytes", "Estimated memory of images admitted to processing",
             stats.get("memory_in_use")),
            ("imgserver_max_memory_bytes", "Memory budget of images in processing", stats.get("max_memory")),
            ("imgserver_retry_after_seconds", "Retry-After a refused client is told now", stats.get("retry_after")),
            ("imgserver_open_descriptors", "Files open in the loader", files.get("open")),
            ("imgserver_cache_bytes", "Bytes in the result cache", cache.get("bytes")),
            ("imgserver_cache_entries", "Entries in the result cache", cache.get("entries")),
        ]
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("imgserver_cache_hits", "Result cache hits", cache.get("hits")),
            ("imgserver_cache_misses", "Result cache misses", cache.get("misses")),
            ("imgserver_rejected", "Requests refused because the queue was full", stats.get("rejected")),
            ("imgserver_streams_rejected", "Originals refused because the streams lane was full",
             stats.get("streams_rejected")),
            ("imgserver_files_rejected", "Requests refused because the file loader was full",
             stats.get("files_rejected")),
            ("imgserver_coalesced", "Requests that shared another's processing", stats.get("coalesced")),
            ("imgserver_file_bytes", "Bytes loaded from files", files.get("bytes")),
        ]
        for name, doc, value in counters:
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
        if stats.get("processed") is not None:
            yield CounterMetricFamily("imgserver_processed", "Images really processed (not answered from the "
                                      "memory cache or a result tier)", value=stats["processed"])
        yield from _tier_families(stats)


#: Numbers of a tier's stats() that are levels, not counts (the rest are counters).
TIER_GAUGES = frozenset({"available", "bytes", "entries", "max_bytes", "servers", "down", "connected", "waiting",
                         "pending_bytes"})


def _tier_families(stats: dict[str, Any]) -> Iterator[Any]:
    """The result tiers (issue 11): the service's own counts by tier, and each tier's numbers
    (``imgserver_result_tier_<stat>{tier=...}``, a counter or, for levels, a gauge)."""
    tiers = stats.get("tiers") or {}
    if not tiers:
        return
    for name, doc, values in (
        ("imgserver_tier_hits", "Transforms answered from a result tier, without processing",
         stats.get("tier_hits", {})),
        ("imgserver_tier_failures", "Tier operations that failed, raised or missed the service's guard "
         "deadline (a miss: the request was processed)", stats.get("tier_failures", {})),
    ):
        family = CounterMetricFamily(name, doc, labels=["tier"])
        for tier, value in values.items():
            family.add_metric([tier], value)
        yield family
    yield GaugeMetricFamily("imgserver_tier_puts_pending", "Results being written to the tiers in the background",
                            value=stats.get("tier_puts_pending", 0))
    yield CounterMetricFamily("imgserver_tier_puts_skipped", "Results not offered to a tier: too many writes pending",
                              value=stats.get("tier_puts_skipped", 0))
    families: dict[str, Any] = {}
    for tier, numbers in sorted(tiers.items()):
        for stat, value in sorted(numbers.items()):
            if not isinstance(value, (int, float)) or not stat.isidentifier():
                continue  # bool is an int: a 0/1 gauge ("available")
            family = families.get(stat)
            if family is None:
                kind = GaugeMetricFamily if stat in TIER_GAUGES or isinstance(value, bool) else CounterMetricFamily
                family = families[stat] = kind(f"imgserver_result_tier_{stat}", f"Result tier stat {stat!r}",
                                               labels=["tier"])
            family.add_metric([tier], int(value) if isinstance(value, bool) else value)
    yield from families.values()


class _GaugeCollector:
    """Gauges whose values are read from callables at scrape time."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self) -> Iterator[Any]:
        for name, (doc, read) in list(self.gauges.items()):
            yield GaugeMetricFamily(name, doc, value=read())


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
        self.connections_refused = Counter(
            "imgserver_connections_refused", "HTTP connections refused because max_connections were open",
            registry=self.registry)
        self.connections_dropped = Counter(
            "imgserver_connections_dropped",
            "HTTP connections the server closed: header_timeout, idle_timeout, send_timeout, "
            "body_too_large, bad_request", ["reason"], registry=self.registry)
        self.registry.register(_ServiceCollector(service))
        self._gauges = _GaugeCollector()
        self.registry.register(self._gauges)
        self.lag = LagMonitor(service.reactor)
        self.gauge("imgserver_reactor_lag_seconds",
                   f"Largest reactor lag measured in the last {LAG_WINDOW:g} s", self.lag.current)
        service.observe(lambda kind, seconds: self.processing.observe(seconds))
        #: With ``--processes N``: the :class:`imgserver.cluster.ClusterView` that ``/metrics`` and
        #: ``/healthz`` answer for (every worker); None in a single process.
        self.cluster: Any = None

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Export ``read()`` as the gauge ``name`` (read at scrape time)."""
        self._gauges.gauges[name] = (doc, read)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def dropped(self, reason: str) -> None:
        self.connections_dropped.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsResource(resource.Resource):
    """``GET /metrics`` rendered in the reactor thread (it is all in memory: with
    several workers, the others' snapshots were read beforehand, off the reactor)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.endpoint = "metrics"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        own = self.metrics.render()
        cluster = self.metrics.cluster
        return cluster.render(own) if cluster is not None else own
