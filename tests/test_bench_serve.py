"""`splitvl bench serve` against the real services: every request it reports was answered as it
says (token counts, text/image split, streamed and whole answers), a sweep gives one point per
load, goodput follows the SLOs, and failures are counted and named, not hidden."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from splitvl.loadgen.client import Outcome
from splitvl.loadgen.report import parse_goodput, summarize
from tests.services import EncodeService, LanguageService, data_url, png

MODEL = "tiny-vl"


@pytest.fixture(scope="module")
def service(vl_ckpt, tmp_path_factory):
    encoder = EncodeService(vl_ckpt, tmp_path_factory.mktemp("encode")).wait_ready()
    language = LanguageService(tmp_path_factory.mktemp("bench"), vl_ckpt, "--encoder", encoder.listen,
                               "--served-model-name", MODEL)
    try:
        language.wait_healthy()
        deadline = time.monotonic() + 30
        while language.health()["encoders_healthy"] != 1:
            assert time.monotonic() < deadline, "the encoder never became healthy"
            time.sleep(0.2)
        yield language
    finally:
        language.stop()
        encoder.stop()


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitvl", "bench", "serve", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_a_sweep_reports_every_request_with_images_and_streams_apart(service, tmp_path):
    result = tmp_path / "result.json"
    run = bench("--base-url", service.url, "--num-prompts", "12", "--max-concurrency", "1,4",
                "--random-input-len", "24", "--random-output-len", "6", "--ignore-eos",
                "--image-size", "32x32,48x40", "--images-per-request", "1", "--image-fraction", "0.5",
                "--stream-fraction", "0.5", "--goodput", "ttft:60000", "e2el:60000", "--result-file", str(result))
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
    run = bench("--base-url", service.url, "--model", MODEL, "--num-prompts", "8", "--request-rate", "50,inf",
                "--max-concurrency", "4", "--random-output-len", "4", "--ignore-eos",
                "--goodput", "tpot:0.001", "--result-file", str(result))
    assert run.returncode == 0, run.stdout + run.stderr
    points = json.loads(result.read_text())["points"]
    assert [p["request_rate"] for p in points] == [50.0, float("inf")]
    for point in points:
        assert point["all"]["completed"] == 8
        assert point["all"]["goodput"] == 0.0  # nobody decodes a token in a microsecond


def test_failed_requests_are_counted_and_named(service, tmp_path):
    dataset = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "ignore_eos": True}
    image = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(32, 32, seed=1))}}, {"type": "text", "text": "what?"}]}],
        "max_tokens": 2, "ignore_eos": True, "stream": False}
    refused = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "read it"}]}]}
    dataset.write_text("\n".join(json.dumps(line) for line in (good, image, refused, good)) + "\n")
    result = tmp_path / "result.json"
    run = bench("--base-url", service.url, "--dataset-path", str(dataset), "--max-concurrency", "2",
                "--result-file", str(result))
    assert run.returncode == 1, run.stdout + run.stderr  # a run with failures says so
    everything = json.loads(result.read_text())["points"][0]["all"]
    assert everything["completed"] == 3 and everything["failed"] == 1
    assert everything["output_tokens"] == 3 + 2 + 3
    (error, count), = everything["errors"].items()
    assert count == 1 and error.startswith("HTTP 400: invalid_image_url") and "local image paths" in error
    assert "1 x HTTP 400" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "the first request failed: HTTP 4"),
    (["--max-concurrency", "0"], "every value must be above 0"),
    (["--images-per-request", "1"], "--images-per-request needs --image-size"),
    (["--image-size", "32"], "write WIDTHxHEIGHT"),
    (["--goodput", "ttft"], "write NAME:MS"),
    (["--request-rate", "5", "--max-concurrency", "1,2"], "one cap, not a list"),
], ids=["unknown-model", "zero-concurrency", "images-without-size", "bad-size", "bad-slo", "rate-with-sweep"])
def test_bad_arguments_get_a_clear_message(service, args, message):
    run = bench("--base-url", service.url, "--num-prompts", "2", "--random-output-len", "2", *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_an_unreachable_server_is_named():
    run = bench("--base-url", "http://127.0.0.1:9", "--num-prompts", "1", timeout=60)
    assert run.returncode == 2 and "cannot list the models at http://127.0.0.1:9" in run.stderr, run.stderr


def test_figures_from_known_timings():
    def outcome(ttft: float, latency: float, tokens: int, images: int = 0) -> Outcome:
        return Outcome(images=images, streamed=True, started=0.0, ttft=ttft, latency=latency, output_tokens=tokens,
                       itls=[(latency - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else [])

    outcomes = [outcome(0.1, 1.1, 11), outcome(0.3, 2.3, 11), outcome(0.2, 0.2, 1, images=1),
                Outcome(images=0, streamed=True, started=0.0, error="HTTP 503: engine_unavailable")]
    figures = summarize(outcomes, duration_s=2.0, slos=parse_goodput(["ttft:250", "tpot:150"]))
    assert (figures["completed"], figures["failed"]) == (3, 1)
    assert figures["output_tokens"] == 23 and figures["output_throughput"] == 11.5
    assert figures["ttft_ms"]["p50"] == pytest.approx(200.0)
    # TPOT of the two long answers: 100 ms and 200 ms; the one-token answer has none.
    assert figures["tpot_ms"]["mean"] == pytest.approx(150.0)
    # Within both SLOs: the first (ttft 100, tpot 100) and the one-token answer (ttft 200).
    assert figures["goodput"] == pytest.approx(1.0) and figures["goodput_share"] == pytest.approx(0.5)
    assert figures["errors"] == {"HTTP 503: engine_unavailable": 1}
