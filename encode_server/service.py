"""The encode service: jobs in, embeddings (or errors) out to each job's reply address.

One job's life, thread by thread:
  intake (1)    receiver.recv -> admit (or refuse `overloaded`) -> worker pool
  fetchers (M)  http(s) sources only: download, at most fetch_per_host at once per host, within
                the job's deadline -> workers
  workers (N)   read any other source -> content key -> cache: hit (answer now), join (an
                identical image is in flight), or lead: decode + preprocess -> batcher
  vision (1)    batcher.next_batch -> one varlen forward -> slice per image -> cache -> answer
                every waiter of each image
  outboxes      one thread and sender per reply address -> transport

Every admitted job is answered exactly once, with an EncodeResult or an EncodeError, and a
failure of one job (bad bytes, a URL that hangs) never stops the others.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from encode_server.batcher import Batcher, VisionItem
from encode_server.cache import Encoded, ResultCache, Waiter
from encode_server.errors import EncodeFailure, from_image_error
from encode_server.fetch_pool import FetchPool
from encode_server.images import ImageError, decode_image
from encode_server.metrics import EncodeMetrics
from encode_server.outbox import Outboxes
from encode_server.preprocess import PreprocessSettings, preprocess
from encode_server.runner import VisionRunner
from encode_server.settings import EncodeSettings
from encode_server.sources import SourceReader, url_host
from encode_server.trust import ReplyPolicy
from models.config import dtype_from_name
from models.device import resolve_device
from models.loader import load_model
from transfer.base import Receiver
from transfer.content_key import content_key
from transfer.messages import EncodeError, EncodeJob, EncodeResult, HealthPing, HealthPong, Message
from transfer.registry import make_receiver

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often the intake thread looks up from recv to notice a shutdown
_DRAIN_LIMIT = 10_000  # at shutdown, jobs already delivered to the receiver are still taken
_MAX_MESSAGE_CHARS = 4000  # the codec's text limit is 4096


class EncodeService:
    def __init__(self, settings: EncodeSettings) -> None:
        self.settings = settings
        self.service_id = settings.service_id or f"{socket.gethostname()}:{os.getpid()}"
        self.state = "loading"  # -> ready -> draining -> stopped
        self.cache = ResultCache(settings.cache_bytes)
        self.batcher = Batcher(settings.batch_token_budget, settings.max_wait_ms / 1000)
        self._in_flight = 0
        self._running = 0  # images in the forward right now
        self._lock = threading.Lock()
        self.metrics = EncodeMetrics(lambda: self.batcher.depth, lambda: self._in_flight, lambda: self.cache.bytes)
        self.outboxes = Outboxes(settings.result_transport, settings.send_timeout_s, self.metrics)
        self.sources = SourceReader(
            max_bytes=settings.max_image_bytes,
            allow_networks=settings.url_allow_list,
            local_roots=settings.allowed_local_roots,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_redirects=settings.fetch_max_redirects,
        )
        self.runner: VisionRunner | None = None
        self.preprocess_settings: PreprocessSettings | None = None
        self.receiver: Receiver | None = None
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="encode worker")
        self._fetches = FetchPool(settings.fetch_workers, settings.fetch_per_host)
        self.trust = ReplyPolicy(settings.reply_to_allow_list, settings.job_token)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Load the vision tower, check it on a probe image, bind the listen address, serve."""
        device = resolve_device(self.settings.device)  # a GPU is made current for streams and copies
        dtype = None if self.settings.dtype == "auto" else dtype_from_name(self.settings.dtype)
        loaded = load_model(self.settings.model, part="vision", device=device, dtype=dtype)
        # cuda_ipc copies results device to device, so they stay on the GPU (cache included).
        self.runner = VisionRunner(loaded.model, device, keep_on_device=self.settings.result_transport == "cuda_ipc")
        self.preprocess_settings = PreprocessSettings.from_pretrained(self.settings.model)
        self._probe()
        self.receiver = make_receiver(self.settings.transport, self.settings.listen)
        self._threads = [
            threading.Thread(target=self._intake_loop, name="encode intake", daemon=True),
            threading.Thread(target=self._vision_loop, name="encode vision", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.state = "ready"
        log.info(
            "encode service %s ready: %s on %s (%s), jobs at %s",
            self.service_id,
            self.settings.model,
            device,
            self.runner.dtype,
            self.receiver.address,
        )

    def stop(self) -> None:
        """Stop taking jobs, answer every job already taken, then close. Bounded by
        shutdown_timeout_s; whatever is still unsent then is dropped (peers retry)."""
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._stopping.set()
        intake, vision = self._threads or (None, None)
        if intake is not None:
            intake.join(max(0.0, deadline - time.monotonic()))
        self._fetches.shutdown()  # before the workers: fetches hand their bytes on to them
        self._pool.shutdown(wait=True)  # each job is bounded by the fetch and decode limits
        self.batcher.close()
        if vision is not None:
            vision.join(max(0.0, deadline - time.monotonic()))
        self.outboxes.close(max(0.0, deadline - time.monotonic()))
        self.sources.close()
        self.state = "stopped"
        log.info("encode service %s stopped", self.service_id)

    def health(self) -> tuple[bool, dict[str, Any]]:
        body = {
            "status": self.state,
            "service_id": self.service_id,
            "listen": self.receiver.address if self.receiver else None,
            "queued": self.batcher.depth,
            "running": self._running,
            "in_flight": self._in_flight,
        }
        if self.runner is not None:
            body.update(device=str(self.runner.device), dtype=str(self.runner.dtype).removeprefix("torch."))
        return self.state == "ready", body

    def _probe(self) -> None:
        """Encode one generated image through decode, preprocess and the tower; refuse to start
        (rather than report ready) if the output is not what the language side expects."""
        side = max(64, int(self.preprocess_settings.min_pixels**0.5) + 1)
        ramp = bytes(range(256)) * (side * side * 3 // 256 + 1)
        png = io.BytesIO()
        Image.frombytes("RGB", (side, side), ramp[: side * side * 3]).save(png, format="PNG")
        image = decode_image(png.getvalue(), max_pixels_decoded=side * side)
        pixel_values, grid = preprocess(image, self.preprocess_settings)
        [rows] = self.runner.encode([(pixel_values, grid)])
        expected = (self.runner.model.tokens_per_image([grid])[0], self.runner.model.output_width)
        if tuple(rows.shape) != expected or not torch.isfinite(rows).all():
            raise RuntimeError(
                f"the vision tower failed its probe: output {tuple(rows.shape)}, expected "
                f"{expected} and finite values; check the checkpoint and --dtype"
            )

    # ------------------------------------------------------------------------------ intake

    def _intake_loop(self) -> None:
        while not self._stopping.is_set():
            msg = self.receiver.recv(timeout=_POLL_S)
            if msg is not None:
                self._dispatch(msg)
        # Jobs the transport already delivered to us count as taken: answer them too.
        for _ in range(_DRAIN_LIMIT):
            msg = self.receiver.recv(timeout=0)
            if msg is None:
                break
            self._dispatch(msg)
        self.receiver.close()

    def _trusted(self, msg: EncodeJob | HealthPing) -> bool:
        reason = self.trust.refusal(msg)
        if reason is None:
            return True
        self.metrics.refused.labels(reason="token" if "job_token" in reason else "reply_to").inc()
        log.warning("dropped a %s unanswered: %s", type(msg).__name__, reason)
        return False

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, (HealthPing, EncodeJob)) and not self._trusted(msg):
            return
        if isinstance(msg, HealthPing):
            ready = self.state == "ready"
            self.outboxes.post(
                msg.reply_to,
                HealthPong(msg.seq, msg.sent_at, self.service_id, self.batcher.depth, self._running, ready),
            )
            return
        if not isinstance(msg, EncodeJob):
            log.warning("ignored a %s: the encode service takes encode jobs and health pings", type(msg).__name__)
            return
        waiter = Waiter(msg.request_id, msg.image_key, msg.reply_to, time.monotonic())
        with self._lock:
            admitted = self._in_flight < self.settings.max_pending_jobs
            if admitted:
                self._in_flight += 1
        if not admitted:
            self.metrics.jobs.labels("overloaded").inc()
            self.outboxes.post(
                waiter.reply_to,
                EncodeError(
                    waiter.request_id,
                    waiter.image_key,
                    "overloaded",
                    f"The encoder has {self.settings.max_pending_jobs} jobs in flight; retry later or on another encoder.",
                ),
            )
            return
        host = url_host(msg.source)
        if host is None:
            self._pool.submit(self._prepare, msg, waiter, None)
        else:
            self._fetches.submit(host, functools.partial(self._fetch, msg, waiter))

    # ----------------------------------------------------------------------------- fetchers

    def _fetch(self, job: EncodeJob, waiter: Waiter) -> None:
        try:
            data = self.sources.read(job.source, deadline=waiter.received_at + self.settings.fetch_total_timeout_s)
        except EncodeFailure as exc:
            self._answer(waiter, exc)
            return
        except Exception:  # one job's bug must not take the fetcher down
            log.exception("job %s failed", waiter.request_id)
            self._answer(waiter, EncodeFailure("internal", "The encoder failed on this image; see its log."))
            return
        self._pool.submit(self._prepare, job, waiter, data)

    # ----------------------------------------------------------------------------- workers

    def _prepare(self, job: EncodeJob, waiter: Waiter, data: bytes | None) -> None:
        """Source (unless fetched already) -> key -> cache, and for the first asker of a key:
        decode + preprocess -> batcher."""
        key, leader = None, False
        try:
            limit = self.settings.max_pixels_limit or self.preprocess_settings.max_pixels
            settings = self.preprocess_settings.with_overrides(job.options, max_pixels_limit=limit)
            if data is None:
                data = self.sources.read(job.source)
            # The job's options as sent (checked above): the key the language side computes too.
            key = content_key(data, job.options)
            claim = self.cache.claim(key, waiter)
            if claim.hit is not None:
                self.metrics.cache_hits.inc()
                self._answer(waiter, claim.hit)
                return
            if not claim.leader:
                self.metrics.cache_joins.inc()
                return
            leader = True
            self.metrics.cache_misses.inc()
            image = decode_image(data, max_pixels_decoded=self.settings.max_decoded_pixels)
            pixel_values, grid = preprocess(image, settings)
            self.batcher.put(VisionItem(key, self.runner.host_pixel_values(pixel_values), grid))
        except (EncodeFailure, ImageError) as exc:
            failure = from_image_error(exc) if isinstance(exc, ImageError) else exc
        except Exception:  # one job's bug must not take the worker down
            log.exception("job %s failed", waiter.request_id)
            failure = EncodeFailure("internal", "The encoder failed on this image; see its log.")
        else:
            return
        # Jobs that joined the leader's key share its bytes and settings, so they share its fate.
        for w in self.cache.fail(key) if leader else [waiter]:
            self._answer(w, failure)

    # ------------------------------------------------------------------------------ vision

    def _vision_loop(self) -> None:
        while batch := self.batcher.next_batch():
            self._running = len(batch)
            started = time.perf_counter()
            try:
                outputs = self.runner.encode([(item.pixel_values, item.grid) for item in batch])
            except Exception:  # e.g. device out of memory; the loop must go on
                log.exception("vision forward of %d images failed", len(batch))
                failure = EncodeFailure("internal", "The encoder's vision forward failed; retry the request.")
                for item in batch:
                    for waiter in self.cache.fail(item.key):
                        self._answer(waiter, failure)
                continue
            finally:
                self._running = 0
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_images.observe(len(batch))
            self.metrics.batch_patches.observe(sum(item.patches for item in batch))
            for item, rows in zip(batch, outputs):
                encoded = Encoded(item.key, item.grid, rows)
                for waiter in self.cache.complete(item.key, encoded):
                    self._answer(waiter, encoded)

    # ------------------------------------------------------------------------------ answers

    def _answer(self, waiter: Waiter, outcome: Encoded | EncodeFailure) -> None:
        if isinstance(outcome, Encoded):
            msg: Message = EncodeResult(
                waiter.request_id, waiter.image_key, outcome.grid, outcome.embeddings, content_key=outcome.key
            )
            self.metrics.jobs.labels("ok").inc()
        else:
            msg = EncodeError(waiter.request_id, waiter.image_key, outcome.code, outcome.message[:_MAX_MESSAGE_CHARS])
            self.metrics.jobs.labels(outcome.code).inc()
        self.metrics.latency_seconds.observe(time.monotonic() - waiter.received_at)
        with self._lock:
            self._in_flight -= 1
        self.outboxes.post(waiter.reply_to, msg)
