"""`splitvl bench serve` against the real services: every request it reports was answered as it
says (token counts, text/image split, streamed and whole answers), a sweep gives one point per
load, goodput follows the SLOs, and failures are counted and named, not hidden."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from splitvl.loadgen.client import Outcome
from splitvl.loadgen.report import parse_goodput, summarize
from tests.services import EncodeService, LanguageService, data_url, png

MODEL = "tiny-vl"


@pytest.fixture(scope="module")
def service(vl_ckpt, tmp_path_factory):
    encoder = EncodeService(vl_ckpt, tmp_path_factory.mktemp("encode")).wait_ready()
    language = LanguageService(
        tmp_path_factory.mktemp("bench"), vl_ckpt, "--encoder", encoder.listen, "--served-model-name", MODEL
    )
    try:
        language.wait_healthy()
        language.wait_encoder()
        yield language
    finally:
        language.stop()
        encoder.stop()


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitvl", "bench", "serve", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_sweep_reports_every_request_with_images_and_streams_apart(service, tmp_path):
    result = tmp_path / "result.json"
    run = bench(
        "--base-url",
        service.url,
        "--num-prompts",
        "12",
        "--max-concurrency",
        "1,4",
        "--random-input-len",
        "24",
        "--random-output-len",
        "6",
        "--ignore-eos",
        "--image-size",
        "32x32,48x40",
        "--images-per-request",
        "1",
        "--image-fraction",
        "0.5",
        "--stream-fraction",
        "0.5",
        "--goodput",
        "ttft:60000",
        "e2el:60000",
        "--result-file",
        str(result),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(result.read_text())
    assert data["model"] == MODEL  # found through GET /v1/models
    assert [p["max_concurrency"] for p in data["points"]] == [1, 4]
    for point in data["points"]:
        everything, text, image = point["all"], point["text"], point["image"]
        assert everything["completed"] == 12 and everything["failed"] == 0
        assert text["completed"] + image["completed"] == 12 and image["completed"] > 0 and text["completed"] > 0
        # ignore_eos: exactly the asked length, as the server counted it.
        assert everything["output_tokens"] == 12 * 6
        # Image requests carry the image's tokens in their prompts.
        assert image["prompt_tokens"] / image["completed"] > text["prompt_tokens"] / text["completed"]
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            stats = everything[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
        assert everything["goodput_share"] == 1.0
    assert "concurrency 4" in run.stdout and "TTFT p99 (ms)" in run.stdout


def test_open_loop_and_a_strict_slo(service, tmp_path):
    result = tmp_path / "result.json"
    run = bench(
        "--base-url",
        service.url,
        "--model",
        MODEL,
        "--num-prompts",
        "8",
        "--request-rate",
        "50,inf",
        "--max-concurrency",
        "4",
        "--random-output-len",
        "4",
        "--ignore-eos",
        "--goodput",
        "tpot:0.001",
        "--result-file",
        str(result),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    points = json.loads(result.read_text())["points"]
    assert [p["request_rate"] for p in points] == [50.0, float("inf")]
    for point in points:
        assert point["all"]["completed"] == 8
        assert point["all"]["goodput"] == 0.0  # nobody decodes a token in a microsecond


def test_failed_requests_are_counted_and_named(service, tmp_path):
    dataset = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "ignore_eos": True}
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png(32, 32, seed=1))}},
                    {"type": "text", "text": "what?"},
                ],
            }
        ],
        "max_tokens": 2,
        "ignore_eos": True,
        "stream": False,
    }
    refused = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                    {"type": "text", "text": "read it"},
                ],
            }
        ]
    }
    dataset.write_text("\n".join(json.dumps(line) for line in (good, image, refused, good)) + "\n")
    result = tmp_path / "result.json"
    run = bench(
        "--base-url",
        service.url,
        "--dataset-path",
        str(dataset),
        "--max-concurrency",
        "2",
        "--result-file",
        str(result),
    )
    assert run.returncode == 1, run.stdout + run.stderr  # a run with failures says so
    everything = json.loads(result.read_text())["points"][0]["all"]
    assert everything["completed"] == 3 and everything["failed"] == 1
    assert everything["output_tokens"] == 3 + 2 + 3
    ((error, count),) = everything["errors"].items()
    assert count == 1 and error.startswith("HTTP 400: invalid_image_url") and "local image paths" in error
    assert "1 x HTTP 400" in run.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "the first request failed: HTTP 4"),
        (["--max-concurrency", "0"], "every value must be above 0"),
        (["--images-per-request", "1"], "--images-per-request needs --image-size"),
        (["--image-size", "32"], "write WIDTHxHEIGHT"),
        (["--goodput", "ttft"], "write NAME:MS"),
        (["--request-rate", "5", "--max-concurrency", "1,2"], "one cap, not a list"),
    ],
    ids=["unknown-model", "zero-concurrency", "images-without-size", "bad-size", "bad-slo", "rate-with-sweep"],
)
def test_bad_arguments_get_a_clear_message(service, args, message):
    run = bench("--base-url", service.url, "--num-prompts", "2", "--random-output-len", "2", *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_an_unreachable_server_is_named():
    run = bench("--base-url", "http://127.0.0.1:9", "--num-prompts", "1", timeout=60)
    assert run.returncode == 2 and "cannot list the models at http://127.0.0.1:9" in run.stderr, run.stderr


def test_figures_from_known_timings():
    def outcome(ttft: float, latency: float, tokens: int, images: int = 0) -> Outcome:
        return Outcome(
            images=images,
            streamed=True,
            started=0.0,
            ttft=ttft,
            latency=latency,
            output_tokens=tokens,
            itls=[(latency - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else [],
        )

    outcomes = [
        outcome(0.1, 1.1, 11),
        outcome(0.3, 2.3, 11),
        outcome(0.2, 0.2, 1, images=1),
        Outcome(images=0, streamed=True, started=0.0, error="HTTP 503: engine_unavailable"),
    ]
    figures = summarize(outcomes, duration_s=2.0, slos=parse_goodput(["ttft:250", "tpot:150"]))
    assert (figures["completed"], figures["failed"]) == (3, 1)
    assert figures["output_tokens"] == 23 and figures["output_throughput"] == 11.5
    assert figures["ttft_ms"]["p50"] == pytest.approx(200.0)
    # TPOT of the two long answers: 100 ms and 200 ms; the one-token answer has none.
    assert figures["tpot_ms"]["mean"] == pytest.approx(150.0)
    # Within both SLOs: the first (ttft 100, tpot 100) and the one-token answer (ttft 200).
    assert figures["goodput"] == pytest.approx(1.0) and figures["goodput_share"] == pytest.approx(0.5)
    assert figures["errors"] == {"HTTP 503: engine_unavailable": 1}


class _ScriptedServer(ThreadingHTTPServer):
    """An OpenAI-style streaming endpoint with known timings: the first piece after FIRST_S, then
    PIECES - 1 more every GAP_S, then usage and [DONE]."""

    FIRST_S, GAP_S, PIECES = 0.30, 0.05, 5

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # /v1/models
        self._send_json({"data": [{"id": "scripted"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if not body["stream"]:
            time.sleep(_ScriptedServer.FIRST_S)
            self._send_json(
                {
                    "choices": [{"message": {"content": "x"}}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": _ScriptedServer.PIECES},
                }
            )
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self._event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})  # no text: not the first token
        time.sleep(_ScriptedServer.FIRST_S)
        for i in range(_ScriptedServer.PIECES):
            if i:
                time.sleep(_ScriptedServer.GAP_S)
            finish = "length" if i == _ScriptedServer.PIECES - 1 else None
            self._event({"choices": [{"delta": {"content": f"t{i}"}, "finish_reason": finish}]})
        self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": _ScriptedServer.PIECES}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk: dict) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def _send_json(self, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def test_timings_are_read_from_the_stream_as_it_arrives(tmp_path):
    server = _ScriptedServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = tmp_path / "result.json"
        run = bench(
            "--base-url",
            server.url,
            "--num-prompts",
            "4",
            "--max-concurrency",
            "2",
            "--stream-fraction",
            "0.5",
            "--seed",
            "3",
            "--result-file",
            str(result),
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        figures = json.loads(result.read_text())["points"][0]["all"]
    finally:
        server.shutdown()
    first, gap, pieces = _ScriptedServer.FIRST_S, _ScriptedServer.GAP_S, _ScriptedServer.PIECES
    slack = 0.04  # loopback and scheduling on a busy CI machine
    assert figures["completed"] == 4 and figures["output_tokens"] == 4 * pieces
    # TTFT is the first piece with text (not the role-only chunk before it), from streamed requests only.
    assert first * 1000 <= figures["ttft_ms"]["p50"] <= (first + slack) * 1000
    assert gap * 1000 <= figures["itl_ms"]["p50"] <= (gap + slack) * 1000
    assert gap * 1000 <= figures["tpot_ms"]["mean"] <= (gap + slack) * 1000
    # Latency covers whole answers too (FIRST_S alone) and streamed ones (FIRST_S + 4 gaps).
    assert first * 1000 <= figures["e2el_ms"]["p50"]
    assert figures["e2el_ms"]["p99"] <= (first + (pieces - 1) * gap + slack) * 1000
