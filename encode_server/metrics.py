"""Prometheus metrics of one encode service, in their own registry (so two services in one
test process never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_BATCH_PATCH_BUCKETS = (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class EncodeMetrics:
    def __init__(
        self, queue_depth: Callable[[], float], jobs_in_flight: Callable[[], float], cache_bytes: Callable[[], float]
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge(
            "splitvl_encode_queue_depth", "Images preprocessed and waiting for the vision tower", registry=r
        ).set_function(queue_depth)
        Gauge("splitvl_encode_jobs_in_flight", "Jobs accepted and not yet answered", registry=r).set_function(
            jobs_in_flight
        )
        Gauge("splitvl_encode_cache_bytes", "Bytes of results held by the cache", registry=r).set_function(cache_bytes)
        self.jobs = Counter(
            "splitvl_encode_jobs", "Jobs answered, by outcome (ok or an error code)", ["outcome"], registry=r
        )
        self.cache_hits = Counter("splitvl_encode_cache_hits", "Jobs answered from the cache", registry=r)
        self.cache_misses = Counter("splitvl_encode_cache_misses", "Jobs whose image had to be encoded", registry=r)
        self.cache_joins = Counter(
            "splitvl_encode_cache_joins", "Jobs that joined an identical image already being encoded", registry=r
        )
        self.batch_images = Histogram(
            "splitvl_encode_batch_images", "Images per vision forward", buckets=_BATCH_IMAGE_BUCKETS, registry=r
        )
        self.batch_patches = Histogram(
            "splitvl_encode_batch_patches",
            "Patches (vision tokens) per forward",
            buckets=_BATCH_PATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "splitvl_encode_forward_seconds",
            "Vision forward time, host to device and back",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency_seconds = Histogram(
            "splitvl_encode_latency_seconds",
            "Job received to answer handed to the sender",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_sent = Counter("splitvl_encode_bytes_sent", "Embedding bytes sent in results", registry=r)
        self.refused = Counter(
            "splitvl_encode_refused",
            "Jobs and pings dropped unanswered: an untrusted reply address, or a missing or wrong job_token",
            ["reason"],
            registry=r,
        )
        self.send_failures = Counter(
            "splitvl_encode_send_failures", "Answers that could not be delivered (peer gone or stalled)", registry=r
        )
