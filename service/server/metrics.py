"""Prometheus metrics: requests, latency and bytes per route, plus the chunk cache.

Each app has its own registry, so several apps in one process (tests) do not collide. With
``--workers N`` every worker process reports its own counters; scrape each, or aggregate them
(``sum by (route)``) in Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import tensorstore as ts
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNROUTED = "unrouted"  # answered before routing (401, 400 path guard) or no route matched

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class TensorstoreCacheCollector(Collector):
    """tensorstore's decoded-chunk cache hit and miss counts (process-wide)."""

    NAMES = {"hit_count": "hits", "miss_count": "misses"}

    def collect(self) -> Iterator[CounterMetricFamily]:
        found = {
            m["name"].rsplit("/", 1)[-1]: m
            for m in ts.experimental_collect_matching_metrics("/tensorstore/cache/")
        }
        for source_name, ours in self.NAMES.items():
            metric = found.get(source_name)
            value = sum(v.get("value", 0) for v in metric["values"]) if metric else 0
            yield CounterMetricFamily(
                f"scancache_chunk_cache_{ours}",
                f"tensorstore chunk cache {ours} in this process",
                value=value,
            )


class Metrics:
    def __init__(self, cache_bytes: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "scancache_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "scancache_http_request_duration_seconds",
            "Time from request to the last body byte handed to the server",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sent = Counter(
            "scancache_http_response_bytes", "Response body bytes sent", ["route"], registry=r
        )
        self.in_flight = Gauge("scancache_http_requests_in_flight", "Requests being answered", registry=r)
        self.region_bytes = Counter(
            "scancache_region_bytes", "Array bytes served before compression", ["array"], registry=r
        )
        self.not_modified = Counter(
            "scancache_not_modified", "Requests answered 304 from an ETag", ["route"], registry=r
        )
        limit = Gauge("scancache_chunk_cache_limit_bytes", "Capacity of the decoded-chunk cache", registry=r)
        limit.set(cache_bytes)
        r.register(TensorstoreCacheCollector())

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNROUTED


class MetricsMiddleware:
    """Counts every HTTP request, including those refused by inner middleware."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        sent = [0]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            elif message["type"] == "http.response.body":
                sent[0] += memoryview(message.get("body", b"")).nbytes
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.in_flight.dec()
            self._observe(scope, status[0], sent[0], time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, sent: int, seconds: float) -> None:
        route = route_label(scope)
        method = scope.get("method", "")
        # Label values are kept forever: any other method a client invents counts as OTHER.
        method = method if method in KNOWN_METHODS else "OTHER"
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        self.metrics.sent.labels(route).inc(sent)
        if status == 304:
            self.metrics.not_modified.labels(route).inc()
