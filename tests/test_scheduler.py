"""Scheduling order: decodes first, then unfinished prompt chunks, then new requests."""

from __future__ import annotations

from language_server.engine.block_manager import BlockManager
from language_server.engine.request import EngineRequest
from language_server.engine.scheduler import Scheduler
from language_server.protocol import GenerateRequest, SamplingParams


def request(rid: str, prompt_len: int) -> EngineRequest:
    ids = [5 + i % 50 for i in range(prompt_len)]
    req = EngineRequest(request=GenerateRequest(rid, ids, SamplingParams(max_tokens=8, temperature=0.0)))
    req.token_ids, req.cache_tokens, req.num_prompt_tokens = list(ids), list(ids), len(ids)
    return req


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule one step and account for it as the engine does; returns tokens per request."""
    chunks = sched.schedule()
    for chunk in chunks:
        chunk.request.num_computed += chunk.count
        if chunk.request.num_computed == chunk.request.num_tokens:
            chunk.request.append_token(7)  # the step's sampled token
    return {c.request.request_id: c.count for c in chunks}


def test_a_long_prompt_admitted_first_does_not_starve_decodes():
    # Budget = one chunk: the long prompt's chunk would fill every step if it came first.
    sched = Scheduler(BlockManager(64, 16, enable_prefix_caching=False), 16, 8, 16)
    long, short = request("long", 100), request("short", 4)
    sched.add(long)
    sched.add(short)
    first = run_step(sched)
    assert first == {"long": 16}  # the budget went to the first waiting request
    second = run_step(sched)
    assert second == {"long": 16}, "short is still waiting: the budget is spent"
    # Make short a decode: admit it with the long prompt still prefilling ahead of it in `running`.
    sched.token_budget = 20
    third = run_step(sched)
    assert third == {"long": 16, "short": 4}
    sched.token_budget = 16
    for _ in range(3):
        step = run_step(sched)
        assert step.get("short") == 1, f"the decode was starved by the prefilling prompt: {step}"
        assert step.get("long") == 15


def test_a_readmitted_request_prefills_after_the_decodes():
    sched = Scheduler(BlockManager(64, 16, enable_prefix_caching=False), 32, 8, 32)
    a, b = request("a", 40), request("b", 3)
    for req in (a, b):
        sched.add(req)
    run_step(sched)  # a: 32 tokens
    run_step(sched)  # a: 8 more (its first token), b admitted: 3
    sched.preempt(a)  # as under KV pressure: a goes back to the front of the queue
    assert run_step(sched) == {"b": 1, "a": 31}  # b decodes first; a recomputes from scratch
    step = run_step(sched)
    assert list(step) == ["b", "a"] and step["b"] == 1
