"""The engine in-process: continuous batching, chunked prefill, paged KV with prefix caching,
preemption, sampling. Encode results are handed to the engine as its encoder client would
(vision tower rows of the same checkpoint); the real encode service is covered in the
service-level tests."""

from __future__ import annotations

import random
import time

import pytest
import torch

from language_server.engine.core import EngineCore
from language_server.protocol import GenerateRequest, ImageRef, SamplingParams
from language_server.settings import LanguageSettings
from models.loader import load_model
from splitvl.offline import ImageInput, OfflineGenerator
from transfer.messages import EncodeJob, EncodeResult
from transfer.registry import make_receiver, make_sender


def make_engine(ckpt, **overrides) -> EngineCore:
    return EngineCore(LanguageSettings(model=str(ckpt), **overrides))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def run_all(engine: EngineCore, requests, max_steps: int = 2000) -> dict[str, list]:
    """Submit everything, step until idle; returns request id -> list of outputs."""
    outputs: dict[str, list] = {}
    for r in requests:
        for o in engine.add_request(r):
            outputs.setdefault(o.request_id, []).append(o)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    assert not engine.has_work()
    return outputs


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 400) for _ in range(n)]


@pytest.fixture(scope="module")
def text_engine_ref(qwen3_text_ckpt):
    ref = OfflineGenerator(qwen3_text_ckpt)
    return qwen3_text_ckpt, ref


def test_concurrent_requests_match_running_alone(text_engine_ref):
    ckpt, ref = text_engine_ref
    rng = random.Random(0)
    reqs = [
        GenerateRequest(f"r{i}", prompt(rng, rng.randrange(3, 60)), greedy(rng.randrange(1, 12))) for i in range(32)
    ]
    engine = make_engine(ckpt, max_num_batched_tokens=96, chunk_size=32)
    outs = run_all(engine, reqs)
    for r in reqs:
        alone = ref.generate_ids(r.prompt_token_ids, max_tokens=r.sampling.max_tokens)
        assert tokens_of(outs[r.request_id]) == alone, r.request_id
        final = outs[r.request_id][-1]
        assert final.finished and final.finish_reason in ("stop", "length")
        assert final.prompt_tokens == len(r.prompt_token_ids)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_long_prompt_is_chunked_while_another_request_decodes(text_engine_ref):
    ckpt, ref = text_engine_ref
    rng = random.Random(1)
    engine = make_engine(ckpt, max_num_batched_tokens=16, chunk_size=8)
    short = GenerateRequest("short", prompt(rng, 4), greedy(30, ignore_eos=True))
    engine.add_request(short)
    engine.step()  # short is now decoding
    long = GenerateRequest("long", prompt(rng, 100), greedy(3))
    engine.add_request(long)
    short_tokens_during_prefill = 0
    while engine.requests.get("long") and engine.requests["long"].num_computed < 100:
        outs = engine.step()
        short_tokens_during_prefill += sum(len(o.new_token_ids) for o in outs if o.request_id == "short")
    assert engine.scheduler.chunked_prefills >= 100 // 8 - 1
    assert short_tokens_during_prefill >= 10  # decoding went on while the prompt was prefilled
    run_all(engine, [])
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_frees_every_block(text_engine_ref):
    ckpt, _ = text_engine_ref
    engine = make_engine(ckpt)
    rng = random.Random(2)
    for i in range(5):
        engine.add_request(GenerateRequest(f"a{i}", prompt(rng, 40), greedy(50, ignore_eos=True)))
    for _ in range(6):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    for i in range(5):
        (out,) = engine.abort(f"a{i}")
        assert out.finished and out.finish_reason == "abort"
    assert not engine.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.abort("a0") == []  # already gone


def test_repeated_prompt_hits_the_prefix_cache(text_engine_ref):
    ckpt, ref = text_engine_ref
    engine = make_engine(ckpt, block_size=4)
    ids = prompt(random.Random(3), 37)
    first = run_all(engine, [GenerateRequest("p1", ids, greedy(5))])
    assert engine.scheduler.prefix_hit_tokens == 0
    second = run_all(engine, [GenerateRequest("p2", ids, greedy(5))])
    assert engine.scheduler.prefix_hit_tokens == 36  # all 9 full blocks
    assert second["p2"][-1].cached_tokens == 36
    assert tokens_of(first["p1"]) == tokens_of(second["p2"]) == ref.generate_ids(ids, max_tokens=5)


def test_preemption_under_kv_pressure_keeps_outputs_exact(text_engine_ref):
    ckpt, ref = text_engine_ref
    rng = random.Random(4)
    reqs = [GenerateRequest(f"q{i}", prompt(rng, 20), greedy(24, ignore_eos=True)) for i in range(6)]
    # 12 blocks of 8 tokens: room for about two of these 44-token sequences at once.
    engine = make_engine(ckpt, block_size=8, num_kv_blocks=12, enable_prefix_caching=False)
    outs = run_all(engine, reqs)
    assert engine.scheduler.preemptions > 0
    eos, ref.eos_ids = ref.eos_ids, set()  # these requests ignore EOS
    try:
        for r in reqs:
            assert tokens_of(outs[r.request_id]) == ref.generate_ids(r.prompt_token_ids, max_tokens=24)
    finally:
        ref.eos_ids = eos
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible(text_engine_ref):
    ckpt, _ = text_engine_ref
    ids = prompt(random.Random(5), 12)

    def sampled(seed: int, rid: str, extra: int = 0) -> list[int]:
        engine = make_engine(ckpt)
        filler = [GenerateRequest(f"fill{i}", prompt(random.Random(i), 9), greedy(8)) for i in range(extra)]
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
        return tokens_of(run_all(engine, [*filler, GenerateRequest(rid, ids, params)])[rid])

    a = sampled(7, "s1")
    assert sampled(7, "s2", extra=3) == a  # same seed, other requests in the batch
    assert sampled(8, "s3") != a


def test_invalid_requests_get_clear_errors(text_engine_ref):
    ckpt, _ = text_engine_ref
    engine = make_engine(ckpt, max_model_len=64)
    cases = {
        "empty": GenerateRequest("e1", [], greedy(4)),
        "vocab": GenerateRequest("e2", [10**7], greedy(4)),
        "too_long": GenerateRequest("e3", list(range(1, 80)), greedy(4)),
        "image_on_text_model": GenerateRequest("e4", [1, 2], greedy(4), images=[ImageRef("data:,", "k")]),
    }
    for name, req in cases.items():
        (out,) = engine.add_request(req)
        assert out.finished and out.finish_reason == "error" and out.error_status == 400, name
        assert out.error_message
    assert not engine.has_work()


def test_image_requests_wait_for_encodes_and_match_offline(vl_ckpt):
    """The test plays the encode service over the real transport with the real vision tower."""
    ref = OfflineGenerator(vl_ckpt)
    vision = load_model(vl_ckpt, part="vision").model
    cfg = ref.config
    gen = torch.Generator().manual_seed(0)
    image = ImageInput(torch.randn(4 * 6, 1536, generator=gen), (1, 4, 6))
    ids = [5, 6, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 7, 8]
    expanded = ref.expand_image_tokens(ids, [image.grid])
    expected = ref.generate_ids(expanded, [image], max_tokens=8)
    source = b"\x00"  # a data URL's bytes, as the HTTP process sends them

    with make_receiver("zmq", "tcp://127.0.0.1:0") as jobs:
        engine = make_engine(vl_ckpt, block_size=4, encoders=[jobs.address])
        outputs: dict[str, list] = {}
        for rid in ("img", "img-again"):
            req = GenerateRequest(rid, ids, greedy(8), images=[ImageRef(source, "key-A", {"max_pixels": 4096})])
            assert engine.add_request(req) == []
            assert engine.add_request(GenerateRequest(f"text-{rid}", [9, 10, 11], greedy(6))) == []
            # The text request runs while the image one waits for its encode result.
            text_outs = [o for _ in range(3) for o in engine.step()]
            assert any(o.request_id == f"text-{rid}" for o in text_outs)
            assert rid in engine.awaiting
            job = next(m for m in iter(lambda: jobs.recv(timeout=5), None) if isinstance(m, EncodeJob))
            # The bytes go on to the encoder as bytes, with the HTTP process's key.
            assert (job.source, job.image_key, job.options) == (b"\x00", "key-A", {"max_pixels": 4096})
            with torch.no_grad():
                rows = vision(image.pixel_values, [image.grid])
            with make_sender("zmq", job.reply_to) as reply:
                reply.send(
                    EncodeResult(
                        request_id=job.request_id, image_key=job.image_key, grid_thw=image.grid, embeddings=rows
                    ),
                    timeout=5,
                )
            for _ in range(500):
                for o in engine.poll_encoders() + (engine.step() if engine.has_work() else []):
                    outputs.setdefault(o.request_id, []).append(o)
                if outputs.get(rid) and outputs[rid][-1].finished:
                    break
            assert tokens_of(outputs[rid]) == expected
            assert outputs[rid][-1].prompt_tokens == len(expanded)
        run_all(engine, [])
        engine.close()
    # The second identical image prompt reused the first one's blocks, image tokens included.
    assert outputs["img-again"][-1].cached_tokens == (len(expanded) - 1) // 4 * 4
    assert engine.encoders.bytes_received == 2 * rows.numel() * 4


def test_url_images_are_prefix_cached_by_the_content_key_the_encoder_reports(vl_ckpt):
    """A URL has no key until the encoder reads it: the engine keys the image's tokens by the
    content key in the result, so the same content at another request hits the cache, and changed
    content at the same URL recomputes and answers as a fresh run on the new image."""
    ref = OfflineGenerator(vl_ckpt)
    vision = load_model(vl_ckpt, part="vision").model
    cfg = ref.config
    gen = torch.Generator().manual_seed(1)
    old, new = (ImageInput(torch.randn(4 * 6, 1536, generator=gen), (1, 4, 6)) for _ in range(2))
    ids = [5, 6, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 7, 8]
    expanded = ref.expand_image_tokens(ids, [old.grid])
    url = "http://images.example/photo.png"
    outputs: dict[str, list] = {}
    with make_receiver("zmq", "tcp://127.0.0.1:0") as jobs:
        engine = make_engine(vl_ckpt, block_size=4, encoders=[jobs.address])
        for rid, image, key in (("first", old, "a" * 64), ("same", old, "a" * 64), ("changed", new, "b" * 64)):
            assert engine.add_request(GenerateRequest(rid, ids, greedy(8), images=[ImageRef(url, "")])) == []
            job = next(m for m in iter(lambda: jobs.recv(timeout=5), None) if isinstance(m, EncodeJob))
            assert job.source == url
            with torch.no_grad():
                rows = vision(image.pixel_values, [image.grid])
            with make_sender("zmq", job.reply_to) as reply:
                reply.send(EncodeResult(job.request_id, job.image_key, image.grid, rows, content_key=key), timeout=5)
            deadline = time.monotonic() + 60  # each request ends before the next starts
            while not (outputs.get(rid) and outputs[rid][-1].finished):
                assert time.monotonic() < deadline, f"{rid} did not finish"
                for o in engine.poll_encoders() + (engine.step() if engine.has_work() else []):
                    outputs.setdefault(o.request_id, []).append(o)
        engine.close()
    assert outputs["same"][-1].cached_tokens == (len(expanded) - 1) // 4 * 4
    assert outputs["changed"][-1].cached_tokens == 0  # its first block already holds image tokens
    want_old, want_new = (ref.generate_ids(expanded, [im], max_tokens=8) for im in (old, new))
    assert want_old != want_new  # else a stale reuse could not show
    assert tokens_of(outputs["first"]) == tokens_of(outputs["same"]) == want_old
    assert tokens_of(outputs["changed"]) == want_new


def test_image_request_without_encoder_fails_cleanly(vl_ckpt):
    engine = make_engine(vl_ckpt)
    cfg = engine.config
    ids = [5, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    (out,) = engine.add_request(GenerateRequest("img", ids, greedy(4), images=[ImageRef("data:,", "k")]))
    assert out.finish_reason == "error" and out.error_status == 503 and "no encode service" in out.error_message
    assert not engine.has_work()
    engine.close()


def test_vl_prompt_prefilled_in_chunks_matches_offline(vl_ckpt):
    """M-RoPE positions of a chunk that ends inside the prompt (a regression: the generated-token
    tail of such a chunk is empty)."""
    ref = OfflineGenerator(vl_ckpt)
    engine = make_engine(vl_ckpt, chunk_size=8, max_num_batched_tokens=8)
    ids = prompt(random.Random(9), 30)
    outs = run_all(engine, [GenerateRequest("vl-chunks", ids, greedy(6))])
    assert tokens_of(outs["vl-chunks"]) == ref.generate_ids(ids, max_tokens=6)
    assert engine.scheduler.chunked_prefills >= 3
    engine.close()


def test_generated_tokens_are_prefix_cached_for_the_next_turn(text_engine_ref):
    """Blocks filled during decode join the cache too: a follow-up prompt that repeats the first
    turn and its answer (as a chat's next turn does) hits every block computed so far."""
    ckpt, _ = text_engine_ref
    engine = make_engine(ckpt, block_size=4)
    ids = prompt(random.Random(10), 37)
    first = tokens_of(run_all(engine, [GenerateRequest("turn1", ids, greedy(12, ignore_eos=True))])["turn1"])
    follow_up = ids + first + [7, 8, 9]
    out = run_all(engine, [GenerateRequest("turn2", follow_up, greedy(2))])["turn2"]
    # 37 prompt + 11 fed-back outputs had their KV computed: 48 tokens = 12 full blocks.
    assert out[-1].cached_tokens == 48


def test_a_step_failing_on_one_requests_data_ends_only_that_request(text_engine_ref, monkeypatch):
    """A model step raises whenever one request is in it (a bug its data triggers): the batch is
    rerun in halves, the culprit alone ends with a 500 and frees its blocks, and every other
    request of the batch carries on exactly as if it had run alone. A CUDA error, after which the
    GPU cannot be trusted, is not caught."""
    ckpt, ref = text_engine_ref
    engine = make_engine(ckpt, num_kv_blocks=64, block_size=4)
    rng = random.Random(11)
    run = engine.runner.run

    def fails_with_poison(chunks):
        if any(c.request.request_id == "poison" for c in chunks):
            raise ValueError("a bug in a kernel")
        return run(chunks)

    monkeypatch.setattr(engine.runner, "run", fails_with_poison)
    reqs = [GenerateRequest(f"d{i}", prompt(rng, 7), greedy(6)) for i in range(5)]
    reqs.insert(3, GenerateRequest("poison", prompt(rng, 7), greedy(6)))
    outs = run_all(engine, reqs)
    last = outs["poison"][-1]
    assert last.finished and last.finish_reason == "error" and last.error_status == 500
    assert last.error_code == "internal_error" and "ValueError" in last.error_message
    for r in reqs:
        if r.request_id != "poison":
            assert outs[r.request_id][-1].finish_reason in ("stop", "length")
            assert tokens_of(outs[r.request_id]) == ref.generate_ids(r.prompt_token_ids, max_tokens=6)
    # The step of six failed, then its half [poison, d3, d4], then [poison] alone.
    assert engine.failed_steps == 3
    assert engine.blocks.num_free == engine.blocks.num_blocks

    def broken(chunks):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "run", broken)
    engine.add_request(GenerateRequest("x", prompt(rng, 5), greedy(2)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()
