"""The engine: requests in, token outputs out, one model step at a time.

An image request first waits in AWAITING_ENCODE while its jobs are out at encoders, and a
constrained one (structured output) while its grammar compiles on the grammar workers; other
requests keep running meanwhile. When all its images are back, each placeholder is expanded
to the image's N tokens, the M-RoPE positions are computed from the grids; once its grammar
is compiled too, it joins the scheduler's queue like any text request, with a grammar matcher
that each of its sampled tokens advances.
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from language_server.engine.block_manager import BlockManager
from language_server.engine.encoder_client import EncodeOutcome, EncoderClient
from language_server.engine.grammar import KINDS, Grammars
from language_server.engine.model_runner import ScheduledChunk, build_runner
from language_server.engine.ranks import RankGroup
from language_server.engine.request import EngineRequest, ImageState, Status
from language_server.engine.sampler import make_generator
from language_server.engine.scheduler import Scheduler
from language_server.protocol import (
    LOGIT_BIAS_LIMIT,
    Constraint,
    EngineStats,
    GenerateRequest,
    RequestOutput,
)
from language_server.settings import LanguageSettings
from models.config import load_config, load_eos_ids
from models.device import resolve_device
from models.mrope import mrope_positions
from models.parallel import SINGLE, check_divisible
from transfer.content_key import is_content_key

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, settings: LanguageSettings) -> None:
        self.settings = settings
        device = str(resolve_device(settings.device))  # made current first: nothing lands on another GPU
        # Before the model: with cuda_ipc results the receive region comes out of the model's
        # GPU, so the KV cache, sized from the memory left free, leaves room for it.
        self.encoders = EncoderClient(
            settings.encoders,
            settings.transport,
            settings.result_address,
            settings.encode_timeout_s,
            settings.encode_retries,
            settings.encoder_health_interval_s,
            settings.result_transport,
            device,
            settings.result_lease_mib,
            settings.encoder_token,
        )
        self.ranks: RankGroup | None = None
        try:
            tp = SINGLE
            if settings.tensor_parallel_size > 1:
                # Refused by name before any rank starts (loading would refuse it too, on every rank).
                check_divisible(
                    load_config(settings.model).text, settings.tensor_parallel_size, settings.expert_parallel
                )
                devices = settings.model_copy(update={"device": device}).devices_of_ranks()
                self.ranks = RankGroup(settings, devices, torch.device(device))
                tp = self.ranks.tp
            self.runner = build_runner(settings, device, tp, self.ranks.step if self.ranks else None)
        except BaseException:
            if self.ranks is not None:
                self.ranks.abort()  # a rank may be stuck in start-up's collectives
                self.ranks = None
            self.encoders.close()  # its socket and region, for callers that live on (tests, benchmarks)
            raise
        self.config = self.runner.config
        self.blocks = BlockManager(self.runner.num_kv_blocks, settings.block_size, settings.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, settings.max_num_batched_tokens, settings.max_num_seqs, settings.chunk_size
        )
        self.eos_ids = set(load_eos_ids(settings.model, self.config))
        # The longest sequence the cache can hold bounds max_model_len.
        self.max_model_len = min(settings.max_model_len, self.runner.num_kv_blocks * settings.block_size)
        # Cheap until the first constrained request: it loads xgrammar and the tokenizer then.
        self.grammars = Grammars(
            settings.model, self.config.text.vocab_size, sorted(self.eos_ids), settings.grammar_compile_timeout_s
        )
        self.requests: dict[str, EngineRequest] = {}
        self.awaiting: dict[str, EngineRequest] = {}  # image jobs out at encoders
        self.compiling: dict[str, EngineRequest] = {}  # constraint compiling
        self.steps = 0
        self.failed_steps = 0
        self.encode_wait_total = 0.0
        self.encode_waits = 0

    # ----- requests in ---------------------------------------------------------------------

    def add_request(self, request: GenerateRequest) -> list[RequestOutput]:
        """Queue a request; returns an immediate error output if it can't be served."""
        rid = request.request_id
        if rid in self.requests:
            return [_error(rid, "duplicate_request", f"request id {rid!r} is already running", 400)]
        problem = self._validate(request)
        if problem:
            return [_error(rid, "invalid_request", problem, 400)]
        req = EngineRequest(request=request, images=[ImageState(key=im.key) for im in request.images])
        req.generator = make_generator(request.sampling, self.runner.device)
        params = request.sampling
        if params.min_tokens:
            req.min_tokens_banned = frozenset(params.stop_token_ids) | (
                frozenset() if params.ignore_eos else frozenset(self.eos_ids)
            )
        self.requests[rid] = req
        if request.constraint is not None:
            req.status = Status.AWAITING_GRAMMAR
            self.compiling[rid] = req
            self.grammars.submit(rid, request.constraint)
        if not request.images:
            return [] if rid in self.compiling else self._ready(req)
        req.status = Status.AWAITING_ENCODE
        self.awaiting[rid] = req
        failures = []
        for i, image in enumerate(request.images):
            outcome = self.encoders.submit(rid, i, image.key, image.source, image.options)
            if outcome is not None:
                failures.extend(self._on_encoded(outcome))
        return failures

    def _validate(self, request: GenerateRequest) -> str | None:
        vocab = self.config.text.vocab_size
        if not request.prompt_token_ids:
            return "the prompt is empty"
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            return f"prompt token ids must be in [0, {vocab})"
        problem = _constraint_problem(request.constraint) or self._logit_bias_problem(request.sampling.logit_bias)
        if problem:
            return problem
        if request.sampling.max_tokens < 1:
            return "max_tokens must be at least 1"
        if not 0 <= request.sampling.min_tokens <= request.sampling.max_tokens:
            return "min_tokens must be from 0 to max_tokens"
        if request.images and not self.config.is_vl:
            return "this model is text-only and cannot take images"
        if len(request.images) > self.settings.max_images_per_request:
            return f"at most {self.settings.max_images_per_request} images per request"
        if self.config.is_vl and request.prompt_token_ids.count(self.config.image_token_id) != len(request.images):
            return "the prompt's image placeholders do not match the number of images"
        return self._length_problem(len(request.prompt_token_ids))

    def _logit_bias_problem(self, logit_bias: list) -> str | None:
        vocab = self.config.text.vocab_size
        for pair in logit_bias:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                return "logit_bias entries must be (token id, bias) pairs"
            tok, bias = pair
            if not isinstance(tok, int) or not 0 <= tok < vocab:
                return f"logit_bias token ids must be in [0, {vocab})"
            if not isinstance(bias, (int, float)) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                return f"logit_bias values must be from -{LOGIT_BIAS_LIMIT:g} to {LOGIT_BIAS_LIMIT:g}"
        return None

    def _length_problem(self, prompt_len: int) -> str | None:
        if prompt_len >= self.max_model_len:
            return (
                f"the prompt is {prompt_len} tokens (images included); this server's maximum context is "
                f"{self.max_model_len} tokens including the completion"
            )
        return None

    def abort(self, request_id: str) -> list[RequestOutput]:
        req = self.requests.get(request_id)
        if req is None:
            return []
        return [self._finish(req, "abort")]

    # ----- encode results ------------------------------------------------------------------

    def poll_encoders(self) -> list[RequestOutput]:
        outputs = []
        for outcome in self.encoders.poll():
            outputs.extend(self._on_encoded(outcome))
        return outputs

    def _on_encoded(self, outcome: EncodeOutcome) -> list[RequestOutput]:
        req = self.awaiting.get(outcome.request_id)
        if req is None:
            return []
        if outcome.result is None:
            return [self._finish(req, "error", outcome.error_code, outcome.error_message, outcome.error_status)]
        result = outcome.result
        image = req.images[outcome.image_index]
        expected_width = self.config.text.hidden_size * (1 + self.config.vision.num_deepstack_levels)
        t, h, w = result.grid_thw
        merge = self.config.vision.spatial_merge_size
        if result.embeddings.shape != (t * h * w // merge**2, expected_width):
            return [
                self._finish(
                    req,
                    "error",
                    "encoder_mismatch",
                    "the encode service serves a different model than this language service",
                    500,
                )
            ]
        image.grid = tuple(result.grid_thw)
        image.rows = result.embeddings.to(self.runner.device, self.runner.dtype)
        image.key = _image_identity(result.content_key, image.key)
        if all(im.rows is not None for im in req.images):
            del self.awaiting[req.request_id]
            for ref in req.request.images:
                ref.source = b""  # only a retry needed the bytes, and every result is in
            req.encode_wait_s = time.monotonic() - req.arrival
            self.encode_wait_total += req.encode_wait_s
            self.encode_waits += 1
            if req.request_id in self.compiling:
                req.status = Status.AWAITING_GRAMMAR
                return []
            return self._ready(req)
        return []

    # ----- grammars ------------------------------------------------------------------------

    def poll_grammars(self) -> list[RequestOutput]:
        """Requests whose constraint finished compiling (or failed, or ran past the limit)."""
        outputs = []
        for outcome in self.grammars.poll():
            req = self.compiling.pop(outcome.request_id, None)
            if req is None:
                continue
            if outcome.matcher is None:
                outputs.append(
                    self._finish(req, "error", outcome.error_code, outcome.error_message, outcome.error_status)
                )
                continue
            req.matcher = outcome.matcher
            if req.request_id not in self.awaiting:
                outputs.extend(self._ready(req))
        return outputs

    def _ready(self, req: EngineRequest) -> list[RequestOutput]:
        """Expand image placeholders, compute positions, and queue the request. Called only once
        every image's result is in, so the prefix cache, matched at admission, sees each image as
        the content key of what the encoder read (a URL's current content, not its text)."""
        cfg = self.config
        ids: list[int] = []
        cache_tokens: list = []
        images = iter(req.images)
        for tok in req.request.prompt_token_ids:
            if cfg.is_vl and tok == cfg.image_token_id:
                image = next(images)
                n = image.rows.shape[0]
                ids.extend([tok] * n)
                cache_tokens.extend((image.key, j) for j in range(n))
            else:
                ids.append(tok)
                cache_tokens.append(tok)
        problem = self._length_problem(len(ids))
        if problem:
            return [self._finish(req, "error", "context_length_exceeded", problem, 400)]
        req.token_ids, req.cache_tokens, req.num_prompt_tokens = ids, cache_tokens, len(ids)
        if cfg.is_vl:
            grids = [im.grid for im in req.images]
            req.positions, req.rope_delta = mrope_positions(
                ids, grids, cfg.image_token_id, cfg.vision.spatial_merge_size
            )
            if req.images:
                req.attach_image_rows(torch.cat([im.rows for im in req.images]), cfg.image_token_id)
                for im in req.images:
                    im.rows = None  # kept once, in image_rows
        self.scheduler.add(req)
        return []

    # ----- stepping ------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Is there a model step to run? Requests awaiting encodes or compiles are not work for a
        step: the engine loop's idle poll comes back for them within milliseconds."""
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        return self._run(chunks)

    def _run(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        try:
            tokens, logprobs = self.runner.run(chunks)
        except Exception as exc:
            if self.ranks is not None and (self.ranks.broken or device_is_broken(exc)):
                self.ranks.abort()  # they may be stuck in the step's collectives
                raise  # and no rerun could be trusted to line up with them
            if device_is_broken(exc):
                raise  # the CUDA context is unusable: the process ends and the HTTP side answers 503
            return self._isolate_failure(chunks, exc)
        self.scheduler.after_step(chunks)
        self.steps += 1
        outputs = []
        for chunk, tok, lp in zip([c for c in chunks if c.samples], tokens, logprobs):
            req = chunk.request
            # Matchers advance only here, after the step succeeded: a failed step's rerun is exact.
            if req.matcher is not None and not req.matcher.accept_token(tok):
                outputs.append(self._refused(req, tok))
                continue
            req.append_token(tok)
            if lp is not None:
                req.pending_logprobs.append(lp)
            reason = self._stop_reason(req, tok)
            outputs.append(self._finish(req, reason) if reason else self._flush(req))
        return outputs

    def _refused(self, req: EngineRequest, tok: int) -> RequestOutput:
        """The grammar refused a token drawn under its own mask: a bug, never the client's doing.
        The token is not sent; the request ends rather than break its format."""
        log.error("request %s: its grammar refused token %d, drawn under the grammar's mask", req.request_id, tok)
        return self._finish(
            req,
            "error",
            "internal_error",
            "the structured output could not be continued (an internal error); the server keeps running",
            500,
        )

    def _isolate_failure(self, chunks: list[ScheduledChunk], exc: Exception) -> list[RequestOutput]:
        """A model step raised (a bug one request's data triggers, or memory running out). The
        exception cannot say which request caused it, so the batch is split in halves and each
        half runs again at once, down to single requests: only a request that fails alone ends
        (with a 500); the others carry on as if nothing had happened. Nothing of a failed step
        is kept (computed counts advance only after a step succeeds), so rerunning is exact."""
        self.failed_steps += 1
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if len(chunks) > 1:
            log.warning(
                "a model step over %d requests failed (%s: %s); rerunning it in halves to find the request that fails",
                len(chunks),
                type(exc).__name__,
                exc,
            )
            half = len(chunks) // 2
            return self._run(chunks[:half]) + self._run(chunks[half:])
        req = chunks[0].request
        log.error("the model step of request %s failed on its own; ending it", req.request_id, exc_info=exc)
        message = f"the model step failed ({type(exc).__name__}); the server keeps running"
        return [self._finish(req, "error", "internal_error", message, 500)]

    def _stop_reason(self, req: EngineRequest, tok: int) -> str | None:
        params = req.request.sampling
        if req.matcher is not None and req.matcher.is_terminated():
            return "stop"  # the grammar is complete and took its end token: nothing may follow, ignore_eos or not
        if tok in params.stop_token_ids or (tok in self.eos_ids and not params.ignore_eos):
            return "stop"
        if len(req.output_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _flush(self, req: EngineRequest, finished: bool = False) -> RequestOutput:
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=req.pending_tokens,
            finished=finished,
            finish_reason=req.finish_reason,
            logprobs=req.pending_logprobs if req.request.sampling.logprobs is not None else None,
            prompt_tokens=req.num_prompt_tokens,
            cached_tokens=req.num_cached_prompt_tokens,
            encode_wait_s=req.encode_wait_s,
        )
        req.encode_wait_s = None  # reported with the first output only
        req.pending_tokens, req.pending_logprobs = [], []
        return out

    def _finish(
        self,
        req: EngineRequest,
        reason: str,
        code: str | None = None,
        message: str | None = None,
        status: int | None = None,
    ) -> RequestOutput:
        req.finish_reason = reason
        self.scheduler.finish(req)
        self.awaiting.pop(req.request_id, None)
        self.encoders.cancel(req.request_id)
        if self.compiling.pop(req.request_id, None) is not None:
            self.grammars.cancel(req.request_id)
        self.requests.pop(req.request_id, None)
        req.image_rows = req.image_mask = None
        out = self._flush(req, finished=True)
        out.error_code, out.error_message, out.error_status = code, message, status
        return out

    def stats(self, nonce: int) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            nonce=nonce,
            running=len(s.running),
            waiting=len(s.waiting),
            awaiting_encode=len(self.awaiting),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free,
            prefix_cache_queried_tokens=s.prefix_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_hit_tokens,
            preemptions=s.preemptions,
            chunked_prefills=s.chunked_prefills,
            encoder_bytes_received=self.encoders.bytes_received,
            encode_wait_s_total=self.encode_wait_total,
            encode_waits=self.encode_waits,
            encoders_healthy=self.encoders.num_healthy,
            encoders_total=len(self.encoders.encoders),
            steps=self.steps,
            failed_steps=self.failed_steps,
        )

    def close(self) -> None:
        self.close_ranks()
        self.encoders.close()
        self.grammars.close()

    def close_ranks(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None


def device_is_broken(exc: BaseException) -> bool:
    """Errors after which the GPU cannot be trusted (an illegal address, a device-side assert):
    CUDA reports them once and then fails every later call. Running out of memory is not one."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc))


def _constraint_problem(constraint: Constraint | None) -> str | None:
    if constraint is None:
        return None
    if constraint.kind not in KINDS:
        return f"unknown constraint kind {constraint.kind!r}; one of {', '.join(KINDS)}"
    if not isinstance(constraint.source, str):
        return "a constraint's source must be text"
    return None


def _image_identity(reported: str, sent: str) -> str:
    """An image's prefix-cache identity: the content key the encoder reports (of the bytes it
    read), else the key the HTTP process sent with the bytes; a result keyed by neither (a peer
    that keys nothing) gets a key of its own, so its blocks are never shared."""
    if is_content_key(reported):
        return reported
    return sent or f"unkeyed-{uuid.uuid4().hex}"


def _error(request_id: str, code: str, message: str, status: int) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        finished=True,
        finish_reason="error",
        error_code=code,
        error_message=message,
        error_status=status,
    )
