"""The engine process's client of the encode services.

Sends one EncodeJob per image to the least-loaded healthy encoder, with this process's result
receiver as `reply_to`, so results arrive here and never pass through the HTTP process. A job
that gets no answer within the timeout is retried on another encoder (the slow one is marked
unhealthy); health pings every few seconds take silent or unreachable encoders out and bring
them back once they answer again. An encoder taken out hands its jobs on at once, to a healthy
encoder not yet tried or to a 503, so they do not wait out their timeout on a dead peer.

A source goes out as it came from the HTTP process: a data URL's bytes (decoded there, once) as
a raw frame, a URL or local path as a string the encoder fetches or reads; a retry resends the
same object, with no work on the engine loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from transfer.base import Receiver, Sender, TransportError
from transfer.codec import ProtocolError
from transfer.messages import EncodeError, EncodeJob, EncodeResult, HealthPing, HealthPong
from transfer.registry import make_receiver, make_sender

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 0.5  # an encoder that can't take a job this fast is down or saturated
_UNHEALTHY_AFTER_MISSED_PINGS = 3
# EncodeJob.image_key may not be empty; a URL or path has no key before the encoder reads it
# (its content key comes back in EncodeResult.content_key).
_NO_KEY_YET = "unkeyed"

# EncodeError.code -> HTTP status the API answers with.
ENCODE_ERROR_STATUS = {
    "invalid_image": 400,
    "unsupported_format": 400,
    "unsupported_aspect_ratio": 400,
    "invalid_request": 400,
    "forbidden_source": 400,
    "fetch_failed": 400,
    "image_too_large": 413,
    "overloaded": 503,
}


@dataclass
class EncoderState:
    address: str
    sender: Sender
    healthy: bool = True  # optimistic until pings say otherwise, so the first job need not wait
    in_flight: int = 0
    reported_load: int = 0  # queued + running images in its last pong
    last_pong: float = field(default_factory=time.monotonic)
    service_id: str | None = None  # the instance that answered the last pong ("host:pid" by default)


@dataclass
class _Job:
    request_id: str
    image_index: int
    key: str  # the HTTP process's content key ("" for a URL or path), echoed back by the encoder
    source: bytes | str
    options: dict[str, int]
    encoder: EncoderState | None  # None until sent
    sent_at: float
    attempts: int
    tried: set[str] = field(default_factory=set)


@dataclass
class EncodeOutcome:
    request_id: str
    image_index: int
    result: EncodeResult | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_status: int = 500


def _region_options(transport: str, device: str, lease_mib: int, encoders: int) -> dict[str, object]:
    """cuda_ipc's receive ring on the model's GPU, which the encoders copy into: one lease per
    encoder, plus one so a restarted encoder attaches at once instead of waiting for its old
    lease to expire."""
    if transport != "cuda_ipc":
        return {}
    return {"lease_bytes": lease_mib << 20, "max_senders": encoders + 1, "device": device}


class EncoderClient:
    def __init__(
        self,
        addresses: list[str],
        transport: str,
        result_address: str,
        timeout_s: float,
        retries: int,
        health_interval_s: float,
        result_transport: str = "zmq",
        device: str = "cpu",
        result_lease_mib: int = 64,
        token: str | None = None,
    ) -> None:
        self.receiver: Receiver = make_receiver(
            result_transport,
            result_address,
            **_region_options(result_transport, device, result_lease_mib, len(addresses)),
        )
        self.encoders = [EncoderState(a, make_sender(transport, a)) for a in addresses]
        self.timeout_s = timeout_s
        self.retries = retries
        self.token = token or ""
        self.health_interval_s = health_interval_s
        self.jobs: dict[str, _Job] = {}
        self.bytes_received = 0
        self._ids = itertools.count()
        self._next_ping = 0.0
        self._orphaned: list[EncodeOutcome] = []  # failures of jobs moved off a down encoder

    @property
    def result_address(self) -> str:
        return self.receiver.address

    @property
    def num_healthy(self) -> int:
        return sum(e.healthy for e in self.encoders)

    def submit(
        self, request_id: str, image_index: int, key: str, source: bytes | str, options: dict[str, int]
    ) -> EncodeOutcome | None:
        """Send one image job; an immediate failure (no encoder) comes back as an outcome."""
        return self._dispatch(
            _Job(request_id, image_index, key, source, options, encoder=None, sent_at=0.0, attempts=0)
        )

    def cancel(self, request_id: str) -> None:
        """Forget a request's jobs (aborted); late results for them are dropped."""
        for job_id in [j for j, job in self.jobs.items() if job.request_id == request_id]:
            self.jobs.pop(job_id).encoder.in_flight -= 1

    def poll(self) -> list[EncodeOutcome]:
        """Results that arrived, jobs that timed out for good; also runs health checks."""
        outcomes: list[EncodeOutcome] = []
        while (msg := self.receiver.recv(timeout=0)) is not None:
            outcomes.extend(self._on_message(msg))
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if now - job.sent_at > self.timeout_s:
                # Slow, maybe not dead (its pongs decide that): later jobs prefer other encoders,
                # and its other jobs stay where they are.
                log.warning("encoder %s gave no answer for %s in %.1fs", job.encoder.address, job_id, self.timeout_s)
                job.encoder.healthy = False
                self._move(job_id)
        if now >= self._next_ping:
            self._ping(now)
        outcomes.extend(self._orphaned)
        self._orphaned = []
        return outcomes

    def _mark_down(self, encoder: EncoderState) -> None:
        """Take an encoder out and move its jobs at once (to a healthy encoder not yet tried, or
        to a 503), rather than letting each wait out its timeout on a dead peer."""
        encoder.healthy = False
        for job_id in [j for j, job in self.jobs.items() if job.encoder is encoder]:
            self._move(job_id)

    def _move(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        job.encoder.in_flight -= 1
        outcome = self._dispatch(job, healthy_only=True)
        if outcome is not None:
            self._orphaned.append(outcome)

    def _dispatch(self, job: _Job, healthy_only: bool = False) -> EncodeOutcome | None:
        while True:
            candidates = [e for e in self.encoders if e.address not in job.tried and (e.healthy or not healthy_only)]
            if not candidates or job.attempts > self.retries:
                return self._failure(job)
            # Least loaded first; healthy encoders before ones that missed pings.
            encoder = min(candidates, key=lambda e: (not e.healthy, e.in_flight + e.reported_load))
            job.attempts += 1
            job.tried.add(encoder.address)
            job_id = f"{job.request_id}/{job.image_index}/{next(self._ids)}"
            msg = EncodeJob(
                request_id=job_id,
                image_key=job.key or _NO_KEY_YET,
                source=job.source,
                reply_to=self.receiver.address,
                options=dict(job.options),
                token=self.token,
            )
            try:
                # One already taken out gets no wait: the engine loop blocks in send, and each job
                # for a dead encoder would hold every request behind it for the whole timeout (a
                # live one takes a message at once, as it takes pings).
                encoder.sender.send(msg, timeout=_SEND_TIMEOUT_S if encoder.healthy else 0)
            except TransportError as exc:
                log.warning("encoder %s refused a job: %s", encoder.address, exc)
                self._mark_down(encoder)
                continue
            except ProtocolError as exc:  # this job can't be put on the wire (e.g. a source too long)
                return EncodeOutcome(
                    job.request_id,
                    job.image_index,
                    error_code="invalid_request",
                    error_message=f"the image cannot be sent to the encoder: {exc.reason}",
                    error_status=400,
                )
            job.encoder, job.sent_at = encoder, time.monotonic()
            encoder.in_flight += 1
            self.jobs[job_id] = job
            return None

    def _failure(self, job: _Job) -> EncodeOutcome:
        if not self.encoders:
            message = "this server has no encode service configured, so it cannot take images"
        else:
            message = "no encode service answered in time; try again later"
        return EncodeOutcome(
            job.request_id, job.image_index, error_code="encoder_unavailable", error_message=message, error_status=503
        )

    def _on_message(self, msg: object) -> list[EncodeOutcome]:
        if isinstance(msg, HealthPong):
            self._on_pong(msg)
            return []
        if not isinstance(msg, (EncodeResult, EncodeError)):
            log.warning("ignored an unexpected %s on the result channel", type(msg).__name__)
            return []
        job = self.jobs.pop(msg.request_id, None)
        if job is None:
            return []  # a late answer to a job that was retried elsewhere or cancelled
        job.encoder.in_flight -= 1
        job.encoder.healthy = True
        job.encoder.last_pong = time.monotonic()
        if isinstance(msg, EncodeError):
            return [
                EncodeOutcome(
                    job.request_id,
                    job.image_index,
                    error_code=msg.code,
                    error_message=msg.message,
                    error_status=ENCODE_ERROR_STATUS.get(msg.code, 500),
                )
            ]
        self.bytes_received += msg.embeddings.numel() * msg.embeddings.element_size()
        return [EncodeOutcome(job.request_id, job.image_index, result=msg)]

    def _ping(self, now: float) -> None:
        self._next_ping = now + self.health_interval_s
        for seq, e in enumerate(self.encoders):
            if e.healthy and now - e.last_pong > _UNHEALTHY_AFTER_MISSED_PINGS * self.health_interval_s:
                log.warning(
                    "encoder %s missed %d health checks; taking it out", e.address, _UNHEALTHY_AFTER_MISSED_PINGS
                )
                self._mark_down(e)
            try:
                # seq identifies the encoder: its index in our list.
                e.sender.send(
                    HealthPing(reply_to=self.receiver.address, seq=seq, sent_at=now, token=self.token), timeout=0
                )
            except TransportError:
                if e.healthy:  # no connected peer: it is gone (a live one takes pings at once)
                    log.warning("encoder %s is unreachable; taking it out", e.address)
                    self._mark_down(e)

    def _on_pong(self, pong: HealthPong) -> None:
        if not 0 <= pong.seq < len(self.encoders):
            return
        e = self.encoders[pong.seq]
        e.healthy = pong.ready
        e.reported_load = pong.queued + pong.running
        e.last_pong = time.monotonic()
        if e.service_id is not None and pong.service_id != e.service_id:
            self._restarted(e, pong.service_id)
        e.service_id = pong.service_id

    def _restarted(self, encoder: EncoderState, service_id: str) -> None:
        """A new instance answers at this address (a supervisor restarted it before pings missed
        the old one): the jobs sent to the old one died with it. Send them again at once, to the
        new instance too (its cache joins a job it did receive; the first answer wins), or 503."""
        lost = [j for j, job in self.jobs.items() if job.encoder is encoder]
        log.warning(
            "encoder %s restarted (%s -> %s); sending its %d jobs in flight again",
            encoder.address,
            encoder.service_id,
            service_id,
            len(lost),
        )
        for job_id in lost:
            job = self.jobs[job_id]
            job.tried.discard(encoder.address)  # the instance that took it is gone, not this address
            job.attempts -= 1
            self._move(job_id)

    def close(self) -> None:
        for e in self.encoders:
            e.sender.close()
        self.receiver.close()
