"""The engine as its own process, spoken to over zmq exactly as the HTTP process does."""

from __future__ import annotations

import multiprocessing as mp

import msgpack
import pytest
import zmq

from language_server.engine.process import run_engine_process
from language_server.protocol import (
    AbortRequest,
    EngineFatal,
    EngineReady,
    EngineStats,
    GenerateRequest,
    ImageRef,
    RequestOutput,
    SamplingParams,
    StatsRequest,
    pack,
    unpack,
)
from language_server.settings import LanguageSettings
from splitvl.offline import OfflineGenerator


class EngineHandle:
    def __init__(self, tmp_path, model: str, **settings):
        self.ctx = zmq.Context()
        self.outputs = self.ctx.socket(zmq.PULL)
        self.outputs.bind(f"ipc://{tmp_path}/out")
        self.requests = self.ctx.socket(zmq.PUSH)
        request_address = f"ipc://{tmp_path}/in"
        self.requests.connect(request_address)
        dump = LanguageSettings(model=model, **settings).model_dump()
        self.proc = mp.get_context("spawn").Process(
            target=run_engine_process, args=(dump, request_address, f"ipc://{tmp_path}/out"), daemon=True
        )
        self.proc.start()

    def recv(self, timeout_ms: int = 60000):
        assert self.outputs.poll(timeout_ms), "engine did not answer"
        return unpack(self.outputs.recv())

    def send(self, msg) -> None:
        self.requests.send(pack(msg))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)
        self.ctx.destroy(linger=0)


def test_image_bytes_cross_to_the_engine_as_msgpack_binary():
    """A data URL's bytes (decoded by the HTTP process) travel as themselves, not as base64 text;
    a URL stays a string and has no key until the encoder reads it."""
    data = bytes(range(256)) * 64
    request = GenerateRequest(
        "img",
        [1, 2, 3],
        SamplingParams(max_tokens=1),
        images=[ImageRef(data, "ab" * 32, {"max_pixels": 4096}), ImageRef("http://images.example/a.png", "")],
    )
    raw = pack(request)
    assert data in raw and len(raw) < len(data) + 1024  # base64 would add a third
    sources = [image["source"] for image in msgpack.unpackb(raw, raw=False)["images"]]
    assert [type(s) for s in sources] == [bytes, str]
    assert unpack(raw) == request


@pytest.fixture
def engine(tmp_path, qwen3_text_ckpt):
    handle = EngineHandle(tmp_path, str(qwen3_text_ckpt))
    yield handle
    handle.close()
    assert handle.proc.exitcode is not None


def test_engine_process_serves_requests_aborts_and_stats(engine, qwen3_text_ckpt):
    ready = engine.recv()
    assert isinstance(ready, EngineReady) and ready.num_kv_blocks > 0
    ids = [5, 6, 7, 8, 9]
    engine.send(GenerateRequest("a", ids, SamplingParams(max_tokens=6, temperature=0.0)))
    engine.send(GenerateRequest("b", ids, SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)))
    got: dict[str, list[int]] = {"a": [], "b": []}
    finished = {}
    while "a" not in finished or len(got["b"]) < 20:
        out = engine.recv()
        assert isinstance(out, RequestOutput)
        got[out.request_id] += out.new_token_ids
        if out.finished:
            finished[out.request_id] = out.finish_reason
    assert got["a"] == OfflineGenerator(qwen3_text_ckpt).generate_ids(ids, max_tokens=6)
    engine.send(AbortRequest("b"))
    while True:
        out = engine.recv()
        if out.request_id == "b" and out.finished:
            assert out.finish_reason == "abort"
            break
    engine.send(StatsRequest(nonce=42))
    stats = engine.recv()
    assert isinstance(stats, EngineStats) and stats.nonce == 42
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0


def test_engine_reports_a_bad_checkpoint_and_exits(tmp_path):
    handle = EngineHandle(tmp_path, str(tmp_path / "nowhere"))
    try:
        fatal = handle.recv()
        assert isinstance(fatal, EngineFatal) and "config.json" in fatal.message
        handle.proc.join(30)
        assert handle.proc.exitcode == 1
    finally:
        handle.close()
