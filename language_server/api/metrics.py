"""Prometheus metrics: latencies measured here, engine state from an EngineStats snapshot.

Latencies are observed in the HTTP process as the client sees them (from request arrival).
Engine gauges and counters are read from the EngineStats fetched for each scrape, so /metrics
always shows the engine's current state rather than a stale copy.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from language_server.protocol import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        gauges = {
            "splitvl_num_requests_running": ("sequences in the engine's running batch", s.running),
            "splitvl_num_requests_waiting": ("sequences queued in the engine", s.waiting),
            "splitvl_num_requests_awaiting_encode": ("sequences waiting for image encodings", s.awaiting_encode),
            "splitvl_kv_blocks_total": ("KV cache blocks", s.kv_blocks_total),
            "splitvl_kv_blocks_free": ("KV cache blocks free", s.kv_blocks_free),
            "splitvl_kv_blocks_used": ("KV cache blocks in use", s.kv_blocks_total - s.kv_blocks_free),
            "splitvl_prefix_cache_hit_rate": (
                "prefix cache hit tokens / queried tokens since start",
                s.prefix_cache_hit_tokens / s.prefix_cache_queried_tokens if s.prefix_cache_queried_tokens else 0.0,
            ),
            "splitvl_encoders_healthy": ("encode services answering health checks", s.encoders_healthy),
            "splitvl_encoders_total": ("encode services configured", s.encoders_total),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "splitvl_prefix_cache_queried_tokens": (
                "prompt tokens looked up in the prefix cache",
                s.prefix_cache_queried_tokens,
            ),
            "splitvl_prefix_cache_hit_tokens": (
                "prompt tokens served from the prefix cache",
                s.prefix_cache_hit_tokens,
            ),
            "splitvl_preemptions": ("sequences preempted for lack of KV blocks", s.preemptions),
            "splitvl_chunked_prefills": ("prefill steps that covered part of a prompt", s.chunked_prefills),
            "splitvl_encoder_bytes_received": (
                "bytes of encode results received by the engine",
                s.encoder_bytes_received,
            ),
            "splitvl_engine_steps": ("engine steps", s.steps),
            "splitvl_engine_failed_steps": (
                "engine steps that raised (rerun in halves; a request failing alone ends with a 500)",
                s.failed_steps,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "splitvl_time_to_first_token_seconds",
            "request arrival to its first generated token (image requests include encoding)",
            ["images"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for images in ("yes", "no"):  # both series exist from the start, so dashboards see zeros
            self.ttft.labels(images=images)
        self.inter_token = Histogram(
            "splitvl_inter_token_latency_seconds", "time between generated tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "splitvl_e2e_request_latency_seconds",
            "request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "splitvl_requests", "finished generation requests by finish reason", ["finish_reason"], registry=r
        )
        self.errors = Counter(
            "splitvl_request_errors", "requests answered with an error, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("splitvl_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("splitvl_generation_tokens", "tokens generated", registry=r)
        self.encode_wait = Histogram(
            "splitvl_encode_wait_seconds",
            "image requests: engine arrival to the last of their encode results",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_received = Counter("splitvl_http_request_bytes_received", "HTTP request body bytes", registry=r)
        self.in_flight = Gauge("splitvl_http_requests_in_flight", "generation requests being served", registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def render(self, stats: EngineStats | None) -> bytes:
        self._engine.stats = stats
        return generate_latest(self.registry)
