"""Tensor and expert parallelism through the real services: `splitvl language
--tensor-parallel-size N` runs N CPU ranks over gloo (rank 0 the engine process, the others its
workers), an encode service feeds it images, and the official openai client sends concurrent
requests of mixed image sizes, one streamed. Every rank layout must give the one-rank service's
greedy tokens (and transformers', fp32), its logprobs within fp32 noise, and leave no process
behind; a rank that dies must end the service.

The logits bound of the issue (1e-5 of TP=1) is checked where it can be seen,
tests/test_tensor_parallel_model.py in float64: a service computes in float32, where summing
the ranks' partial results in another order alone moves logits by ~1e-5."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from models.tiny_checkpoint import write_tiny_checkpoint
from tests.reference import hf_chat_greedy
from tests.services import EncodeService, LanguageService, alive, children, data_url, descendants, png, wait_gone

MAX_TOKENS = 10
# Six query and six KV heads, six experts (intermediate 48): every count splits over 2 and 3 ranks.
VL_SHAPES = {"num_attention_heads": 6, "num_key_value_heads": 6, "num_experts": 6}
# One KV head: at TP=2 both ranks hold (and cache) a replica of it.
TEXT_SHAPES = {"num_attention_heads": 4, "num_key_value_heads": 1}
LOGPROB_ATOL = 1e-4  # fp32 summation-order noise, with room (observed differences are ~1e-5)


def image_part(width: int, height: int, seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png(width, height, seed))}}


ONE_IMAGE = [{"role": "user", "content": [image_part(96, 64, 0), {"type": "text", "text": "What is this?"}]}]
CONVERSATIONS = {
    "one_image": ONE_IMAGE,
    "two_sizes": [
        {"role": "user", "content": [image_part(24, 56, 1), {"type": "text", "text": "and"}, image_part(64, 64, 2)]}
    ],
    "tall_image": [{"role": "user", "content": [{"type": "text", "text": "Read:"}, image_part(32, 128, 3)]}],
    "text": [{"role": "user", "content": "Say something about tensors."}],
}
STREAMED = "two_sizes"


@pytest.fixture(scope="module")
def vl_tp_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vl_tp"), seed=11, text_overrides=VL_SHAPES)


@pytest.fixture(scope="module")
def text_tp_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("text_tp"), seed=12, arch="qwen3_moe", text_overrides=TEXT_SHAPES
    )


@pytest.fixture(scope="module")
def encoder(vl_tp_ckpt, tmp_path_factory):
    service = EncodeService(vl_tp_ckpt, tmp_path_factory.mktemp("encode")).wait_ready()
    yield service.listen
    service.stop()


def _ask(service: LanguageService, name: str) -> tuple[list[int] | str, list[float]]:
    """Greedy token ids (the streamed conversation: its text) and their logprobs."""
    args = dict(
        model=service.model_name,
        messages=CONVERSATIONS[name],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    client = service.client()
    if name != STREAMED:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.model_extra["token_ids"], [t.logprob for t in choice.logprobs.content]
    text, logprobs = "", []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            logprobs.extend(t.logprob for t in (choice.logprobs.content if choice.logprobs else []))
    return text, logprobs


def serve_all(
    tmp, ckpt, encoder: str, *flags: str, config: dict | None = None
) -> dict[str, tuple[list[int] | str, list[float]]]:
    """Start a language service, send every conversation at once, stop it; check it stopped
    cleanly (every rank at EOF, none killed) and left nothing."""
    service = LanguageService(tmp, ckpt, "--encoder", encoder, *flags, config=config)
    try:
        service.wait_healthy()
        service.wait_encoder()
        processes = descendants(service.proc.pid)
        with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
            answers = dict(zip(CONVERSATIONS, pool.map(lambda n: _ask(service, n), CONVERSATIONS)))
    finally:
        code = service.stop()
    log = service.log.read_text()
    assert code == 0, log
    assert "did not stop within" not in log and "ERROR" not in log, log
    assert not wait_gone(processes), f"left running: {wait_gone(processes, 0)}"
    return answers


@pytest.fixture(scope="module")
def one_rank(vl_tp_ckpt, encoder, tmp_path_factory):
    return serve_all(tmp_path_factory.mktemp("tp1"), vl_tp_ckpt, encoder)


@pytest.fixture(scope="module")
def transformers_one_image(vl_tp_ckpt):
    return hf_chat_greedy(vl_tp_ckpt, MAX_TOKENS)(ONE_IMAGE)[0]


def test_the_one_rank_service_equals_transformers(one_rank, transformers_one_image):
    assert one_rank["one_image"][0] == transformers_one_image


@pytest.mark.parametrize(
    "size,expert_parallel,graphs",
    [(2, False, "nocapture"), (2, True, "off"), (3, False, "off"), (3, True, "nocapture")],
    ids=["tp2", "tp2-ep", "tp3", "tp3-ep"],
)
def test_ranks_give_the_one_rank_tokens(
    size, expert_parallel, graphs, vl_tp_ckpt, encoder, one_rank, transformers_one_image, tmp_path
):
    """`nocapture` runs decode steps on the graph path's buffers (uncaptured on a CPU): those
    steps reach the other ranks as DecodeStep plans, the others as eager ones."""
    flags = ["--tensor-parallel-size", str(size), "--expert-parallel" if expert_parallel else "--no-expert-parallel"]
    answers = serve_all(tmp_path, vl_tp_ckpt, encoder, *flags, config={"cuda_graphs": graphs})
    assert answers["one_image"][0] == transformers_one_image
    for name, (ids, logprobs) in answers.items():
        want_ids, want_logprobs = one_rank[name]
        assert len(logprobs) == MAX_TOKENS and ids == want_ids, name
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < LOGPROB_ATOL, name


def test_text_model_on_two_ranks_equals_transformers(text_tp_ckpt, tmp_path):
    """Qwen3-MoE text-only, its one KV head replicated on both ranks."""
    service = LanguageService(tmp_path, text_tp_ckpt, "--tensor-parallel-size", "2")
    try:
        service.wait_healthy()
        ids, logprobs = _ask(service, "text")
    finally:
        assert service.stop() == 0, service.log.read_text()
    assert len(logprobs) == MAX_TOKENS
    assert ids == hf_chat_greedy(text_tp_ckpt, MAX_TOKENS)(CONVERSATIONS["text"])[0]


def failed_start(service: LanguageService) -> str:
    """The log of a service that must exit non-zero before serving (stopped whatever happens)."""
    try:
        assert service.proc.wait(120) != 0
    finally:
        service.stop()
    return service.log.read_text()


def test_a_shape_that_does_not_split_is_refused_at_start(vl_tp_ckpt, tmp_path):
    log = failed_start(LanguageService(tmp_path, vl_tp_ckpt, "--tensor-parallel-size", "4"))
    assert "tensor_parallel_size=4" in log and "num_attention_heads=6 is not a multiple of 4" in log, log
    assert "num_key_value_heads=6" in log, log


def test_a_killed_rank_ends_the_service(text_tp_ckpt, tmp_path):
    """SIGKILL rank 1 mid-stream: the stream ends with an error, the service exits non-zero within
    10 s saying which rank went, and no process of it is left."""
    service = LanguageService(tmp_path, text_tp_ckpt, "--tensor-parallel-size", "2")
    try:
        service.wait_healthy()
        processes = descendants(service.proc.pid)
        (worker,) = [p for p in processes if "rank_worker" in _cmdline(p)]
        stream = service.client().completions.create(
            model=service.model_name, prompt="tensors", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))  # a request is in flight
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        code = service.proc.wait(10)
        assert time.monotonic() - killed < 10
    finally:
        service.stop()  # whatever failed above, no service outlives the test
    assert code != 0
    log = service.log.read_text()
    assert f"tensor-parallel rank 1 (pid {worker}, device cpu) exited with code -9" in log, log
    assert not wait_gone(processes) and not alive(worker)


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _rank_workers() -> set[int]:
    return {p for p in _all_pids() if "rank_worker" in _cmdline(p)}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_hung_rank_ends_the_service(text_tp_ckpt, tmp_path):
    """SIGSTOP rank 1 (alive, never reading): a 3000-token prompt's plan (~70 KiB) is more than
    its stdin pipe holds, so rank 0 blocks writing it, where no collective's timeout reaches.
    The step's deadline (distributed_timeout_s) ends the service non-zero all the same, and the
    stopped rank is killed with it."""
    config = {"distributed_timeout_s": 2, "max_num_batched_tokens": 4096, "chunk_size": 4096}
    service = LanguageService(tmp_path, text_tp_ckpt, "--tensor-parallel-size", "2", config=config)
    try:
        service.wait_healthy()
        processes = descendants(service.proc.pid)
        (worker,) = [p for p in processes if "rank_worker" in _cmdline(p)]
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(openai.APIError):
            prompt = [(7 * i) % 300 + 5 for i in range(3000)]
            service.client(timeout=30).completions.create(model=service.model_name, prompt=prompt, max_tokens=4)
        assert service.proc.wait(15) != 0
        assert time.monotonic() - stopped < 15
    finally:
        service.stop()
    assert "one of them is hung" in service.log.read_text()
    assert not wait_gone(processes)


def test_a_rank_that_fails_to_start_ends_the_service(text_tp_ckpt, tmp_path):
    """Rank 1 given a GPU this machine does not have: the service exits non-zero at start, saying
    which rank went and why, and leaves no process."""
    config = {"device": "cpu", "rank_devices": ["cpu", "cuda:7"]}
    ranks_before = _rank_workers()
    log = failed_start(LanguageService(tmp_path, text_tp_ckpt, "--tensor-parallel-size", "2", config=config))
    assert "tensor-parallel rank 1" in log and "device cuda:7) exited with code 1" in log, log
    assert "no CUDA GPU is visible" in log, log
    assert not wait_gone(_rank_workers() - ranks_before, 5)


def test_ranks_die_with_a_killed_engine(text_tp_ckpt, tmp_path):
    """SIGKILL the engine process (rank 0): its worker goes within seconds, and the service exits."""
    service = LanguageService(tmp_path, text_tp_ckpt, "--tensor-parallel-size", "2")
    try:
        service.wait_healthy()
        processes = descendants(service.proc.pid)
        (worker,) = [p for p in processes if "rank_worker" in _cmdline(p)]
        (engine,) = [p for p in children(service.proc.pid) if worker in descendants(p)]
        os.kill(engine, signal.SIGKILL)
        assert not wait_gone([worker], 5)
        assert service.proc.wait(15) != 0
    finally:
        service.stop()
    assert not wait_gone(processes)
