"""Structured outputs: each request's Constraint compiled by xgrammar against the checkpoint's
vocabulary, on worker threads, so the engine loop never waits on a compile.

The compiler (the tokenizer's vocabulary padded to the model's logits width, the engine's EOS ids
as the grammar's stop tokens) is built by the first compile, on a worker: a deployment that never
constrains a request imports neither xgrammar nor the tokenizer. xgrammar caches compiled grammars
by their source, so a repeated schema is free; identical constraints in flight at once share one
compile.

JSON (json_schema, json_object) goes through language_server/json_grammar.py, the grammar the
HTTP process builds too: no free whitespace, as OpenAI's strict mode writes it (where any
whitespace is allowed, a model can pad forever and never finish), and no raw control characters
in length-bounded strings (xgrammar 0.2.9 lets them through there).

A compile cannot be interrupted: xgrammar's C++ has no cancellation point, and Python cannot stop
a thread. So a compile running past `timeout_s` ends its requests with 400 grammar_too_complex,
its worker is written off and a new one takes its place (later compiles do not queue behind it),
and the old thread leaves once its compile returns. Compiles release the GIL, so even a stuck one
slows the engine loop only by the CPU it takes.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from language_server.json_grammar import json_schema_grammar
from language_server.protocol import Constraint

if TYPE_CHECKING:  # imported on the first compile: text-only deployments never load it
    import xgrammar as xgr

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "grammar", "structural_tag")
_ANY_OBJECT = '{"type": "object"}'  # json_object; strict mode closes only objects that list properties
_WORKERS = 2  # compiles at once; each also fans its token-mask work out over the compiler's threads
_COMPILER_THREADS = min(8, os.cpu_count() or 1)
# Bounds the memory of the compiler's cache of compiled grammars, so a stream of distinct
# schemas cannot grow the engine process without end.
_CACHE_LIMIT_BYTES = 512 << 20
# At most this many written-off compiles get a replacement thread at once: a flood of pathological
# grammars then waits in the queue instead of taking every core.
_MAX_WRITTEN_OFF = 8
_MESSAGE_CHARS = 300
# xgrammar's C++ errors open with a time, a source position and sometimes a check's text; the
# client needs none of them.
_NOISE = re.compile(r"^\[[0-9:.]+\] \S+:\d+: (Check failed: .*? is false: )?")


@dataclass
class GrammarOutcome:
    """A compile's result for one waiting request: a matcher of its own, or the error to end it with."""

    request_id: str
    matcher: xgr.GrammarMatcher | None
    error_code: str | None = None
    error_message: str | None = None
    error_status: int | None = None


@dataclass
class _Job:
    kind: str
    source: str
    waiters: dict[str, None] = field(default_factory=dict)  # request ids, kept in arrival order for the queue
    cancelled: bool = False  # every waiter left before a worker took it: skip it
    started: float | None = None  # when the compile itself began (set by the worker)
    seconds: float | None = None  # how long it took, once done
    compiled: Any = None
    error: tuple[str, str, int] | None = None  # (code, message, status)
    replaced: bool = False  # written off: its worker leaves once the compile returns
    done: threading.Event = field(default_factory=threading.Event)


class Grammars:
    """Compiles constraints off the engine loop; the loop submits, polls and cancels (all three
    only from the engine's thread)."""

    def __init__(
        self, model_dir: str, vocab_size: int, stop_token_ids: list[int], timeout_s: float, workers: int = _WORKERS
    ) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers every row of the head
        self.stop_token_ids = sorted(stop_token_ids)
        self.timeout_s = timeout_s
        self.workers = workers
        self._jobs: dict[tuple[str, str], _Job] = {}  # in flight, by (kind, source)
        self._waiting: dict[str, _Job] = {}  # request id -> the job it waits for
        self._orphans: list[_Job] = []  # jobs every waiter left: watched only to write off a stuck one
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads_started = False
        self._written_off: list[_Job] = []
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return bool(self._waiting)

    def submit(self, request_id: str, constraint: Constraint) -> None:
        key = (constraint.kind, constraint.source)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(constraint.kind, constraint.source)
            self._start_threads()
            self._queue.put(job)
        job.waiters[request_id] = None
        self._waiting[request_id] = job

    def cancel(self, request_id: str) -> None:
        """The request ended (aborted, or failed elsewhere): it no longer waits. A compile nobody
        waits for is skipped if it has not started; a running one cannot be stopped (its result
        just lands in the compiler's cache), and it is still written off if it overruns."""
        job = self._waiting.pop(request_id, None)
        if job is None:
            return
        del job.waiters[request_id]
        if not job.waiters:
            job.cancelled = True
            del self._jobs[(job.kind, job.source)]
            self._orphans.append(job)

    def poll(self) -> list[GrammarOutcome]:
        """Outcomes for the requests whose compile finished or ran past the limit; never blocks."""
        outcomes: list[GrammarOutcome] = []
        now = time.monotonic()
        self._orphans = [job for job in self._orphans if not (job.done.is_set() or self._overran(job, now))]
        for key, job in list(self._jobs.items()):
            if job.done.is_set():
                error = job.error or (self._too_complex() if job.seconds > self.timeout_s else None)
            elif self._overran(job, now):
                error = self._too_complex()
            else:
                continue
            del self._jobs[key]
            for rid in job.waiters:
                del self._waiting[rid]
                outcomes.append(
                    GrammarOutcome(rid, None, *error) if error else GrammarOutcome(rid, _new_matcher(job.compiled))
                )
        return outcomes

    def close(self) -> None:
        if self._threads_started:
            for _ in range(self.workers):
                self._queue.put(None)

    # ----- the workers' side ---------------------------------------------------------------

    def _overran(self, job: _Job, now: float) -> bool:
        """Is the job still compiling past the limit? Then its worker is written off."""
        if job.started is None or now - job.started <= self.timeout_s:
            return False
        self._write_off(job)
        return True

    def _too_complex(self) -> tuple[str, str, int]:
        message = (
            f"the constraint did not compile within {self.timeout_s:g} s (grammar_compile_timeout_s); "
            "use a smaller schema, regex or grammar"
        )
        return ("grammar_too_complex", message, 400)

    def _start_threads(self) -> None:
        if not self._threads_started:
            self._threads_started = True
            for _ in range(self.workers):
                self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="grammar-compile", daemon=True).start()

    def _write_off(self, job: _Job) -> None:
        self._written_off = [j for j in self._written_off if not j.done.is_set()]
        if len(self._written_off) >= _MAX_WRITTEN_OFF:
            log.warning(
                "a grammar compile ran past %g s and %d others still run; later compiles wait for a free worker",
                self.timeout_s,
                len(self._written_off),
            )
            return
        log.warning(
            "a grammar compile ran past %g s; its thread is left to finish (a compile cannot be "
            "interrupted) and a new worker takes its place",
            self.timeout_s,
        )
        job.replaced = True
        self._written_off.append(job)
        self._spawn()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                job.done.set()  # skipped: nobody waits for it
                continue
            self._run(job)
            if job.replaced:
                return  # a replacement serves the queue now

    def _run(self, job: _Job) -> None:
        try:
            compiler = self._get_compiler()
        except Exception as exc:  # any failure to load the tokenizer ends the request
            log.exception("could not build the grammar compiler")
            message = (
                f"structured outputs are unavailable on this server: the tokenizer could not be "
                f"prepared ({type(exc).__name__})"
            )
            job.error = ("internal_error", message, 500)
            job.seconds = 0.0
            job.done.set()
            return
        job.started = time.monotonic()  # the limit is the compile's own time, not the tokenizer's load
        try:
            job.compiled = _compile(compiler, job.kind, job.source)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors for invalid input
            job.error = ("invalid_grammar", f"the {job.kind} constraint cannot be compiled: {_clean(exc)}", 400)
        except Exception as exc:  # a bug, not the client's input
            log.exception("a %s compile failed", job.kind)
            job.error = ("internal_error", f"compiling the constraint failed ({type(exc).__name__})", 500)
        job.seconds = time.monotonic() - job.started
        job.done.set()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                started = time.monotonic()
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=_COMPILER_THREADS, cache_limit_bytes=_CACHE_LIMIT_BYTES
                )
                log.info(
                    "grammar compiler ready in %.2f s (vocabulary %d, stop tokens %s)",
                    time.monotonic() - started,
                    self.vocab_size,
                    self.stop_token_ids,
                )
            return self._compiler


def _new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    import xgrammar as xgr

    # Its stop tokens are the engine's EOS ids (the tokenizer info's): once the grammar is
    # complete only they are allowed, and taking one terminates the matcher.
    return xgr.GrammarMatcher(compiled)


def _compile(compiler: xgr.GrammarCompiler, kind: str, source: str) -> xgr.CompiledGrammar:
    if kind in ("json_schema", "json_object"):
        # The schema's EBNF, fixed up, is compiled (and cached) as a grammar; the conversion runs
        # each time, which for a real schema is a fraction of a millisecond.
        return compiler.compile_grammar(json_schema_grammar(source if kind == "json_schema" else _ANY_OBJECT))
    if kind == "regex":
        return compiler.compile_regex(source)
    if kind == "grammar":
        return compiler.compile_grammar(source)  # EBNF with a `root` rule
    if kind == "structural_tag":
        return compiler.compile_structural_tag(source)  # StructuralTag.model_dump_json()
    raise ValueError(f"unknown constraint kind {kind!r}")  # EngineCore._validate refuses these first


def _clean(exc: BaseException) -> str:
    text = _NOISE.sub("", str(exc).strip()).strip()
    if len(text) > _MESSAGE_CHARS:
        text = text[: _MESSAGE_CHARS - 1] + "…"
    return text or type(exc).__name__
