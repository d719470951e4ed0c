"""`splitvl up` as a user runs it: the console script, no model (the tiny checkpoint is built
into a temporary cache), an image chat through the official openai client, then Ctrl-C (SIGINT
to the process group) and not one process of the tree left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from language_server.settings import LanguageSettings
from splitvl.cli import main
from splitvl.deploy.banner import banner
from splitvl.deploy.config import load_deploy_config
from splitvl.deploy.plan import make_plan
from tests.services import alive, children, data_url, free_port, png, wait_gone

SPLITVL = str(Path(sys.executable).with_name("splitvl"))


def _tree(pid: int) -> set[int]:
    """pid's descendants now (the language engine is a grandchild)."""
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            found.add(child)
            todo.append(child)
    return found


class Up:
    """`splitvl up ...` in its own process group, with its output in a file."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.log = tmp / "up.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [SPLITVL, "up", "--port", str(self.port), "--cache-dir", str(tmp / "cache"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Until the launcher prints that both services are ready (it checks their health first)."""
        deadline = time.monotonic() + timeout
        while "Ctrl-C stops both services." not in self.log.read_text():
            assert self.proc.poll() is None, f"splitvl up exited ({self.proc.returncode}):\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"splitvl up did not become ready:\n{self.log.read_text()}"
            time.sleep(0.2)

    def ctrl_c(self, timeout: float = 60.0) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal sends the foreground group
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_up_serves_an_image_chat_and_ctrl_c_leaves_nothing(tmp_path):
    up = Up(tmp_path)
    try:
        up.wait_serving()
        tree = _tree(up.proc.pid)
        assert len(tree) >= 3, f"expected encode, language and its engine under the launcher, got {tree}"
        assert httpx.get(f"{up.url}/health", timeout=5).json()["encoders_healthy"] == 1
        client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        reply = client.chat.completions.create(
            model=model.id,
            max_tokens=8,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png(96, 64, seed=0))}},
                        {"type": "text", "text": "What is in this image?"},
                    ],
                }
            ],
        )
        assert model.id == "splitvl-tiny"
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
        log = up.log.read_text()
        assert f"{up.url}/v1" in log and "curl -s" in log and "image_url" in log, log
        # The image went through the encode service (its health URL is in the banner).
        encode_url = re.search(r"health at (http://\S+)/health", log).group(1)
        assert 'splitvl_encode_jobs_total{outcome="ok"} 1.0' in httpx.get(f"{encode_url}/metrics").text
        assert up.ctrl_c() == 0, up.log.read_text()
        assert not wait_gone(tree), f"left behind after Ctrl-C:\n{up.log.read_text()}"
        assert "stopping" in up.log.read_text()
    finally:
        up.kill()
    # The demo checkpoint is cached for the next run.
    assert len(list((tmp_path / "cache").glob("tiny-qwen3-vl-moe-*/config.json"))) == 1


def _service_pid(launcher: int, name: str) -> int:
    """The pid of `splitvl up`'s child that runs `name` (encode or language)."""
    for pid in children(launcher):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"splitvl.deploy.child" in argv and name.encode() in argv:
            return pid
    raise AssertionError(f"no {name} service under {launcher}")


def test_a_killed_encoder_is_restarted_while_text_keeps_serving(tmp_path):
    """SIGKILL of the encode service under load: text requests never notice, image requests in
    flight get an answer or a clean 503 within 3 s, and the launcher has the encoder back (and
    the language service linked to it again) within 10 s."""
    up = Up(tmp_path)
    try:
        up.wait_serving()
        client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=30)
        stop = threading.Event()
        text_errors: list[Exception] = []
        image_outcomes: list[tuple[float, float, object]] = []  # (start, seconds, status or error)

        def text_traffic() -> None:
            while not stop.is_set():
                try:
                    client.chat.completions.create(
                        model="splitvl-tiny", max_tokens=8, stream=True, messages=[{"role": "user", "content": "hello"}]
                    ).close()
                except Exception as exc:  # recorded and asserted on
                    text_errors.append(exc)

        def image_traffic(seed: int) -> None:
            while not stop.is_set():
                seed += 100
                start = time.monotonic()
                content = [
                    {"type": "image_url", "image_url": {"url": data_url(png(64, 48, seed=seed))}},
                    {"type": "text", "text": "What is it?"},
                ]
                try:
                    client.chat.completions.create(
                        model="splitvl-tiny", max_tokens=4, messages=[{"role": "user", "content": content}]
                    )
                    outcome: object = 200
                except openai.APIStatusError as exc:
                    outcome = (exc.status_code, exc.body)
                except Exception as exc:
                    outcome = exc
                image_outcomes.append((start, time.monotonic() - start, outcome))

        threads = [threading.Thread(target=text_traffic) for _ in range(2)]
        threads += [threading.Thread(target=image_traffic, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(2)
        encoder = _service_pid(up.proc.pid, "encode")
        killed = time.monotonic()
        os.kill(encoder, signal.SIGKILL)
        deadline = killed + 10
        while (
            not re.search("the encode service is back", up.log.read_text())
            or httpx.get(f"{up.url}/health", timeout=5).json()["encoders_healthy"] < 1
        ):
            assert time.monotonic() < deadline, f"the encoder was not back within 10 s:\n{up.log.read_text()}"
            time.sleep(0.1)
        time.sleep(2)  # image traffic against the restarted encoder
        stop.set()
        for t in threads:
            t.join(60)
        assert not text_errors, text_errors[:3]
        assert _service_pid(up.proc.pid, "encode") != encoder
        around_kill = [o for o in image_outcomes if o[0] < killed + 3 and o[0] + o[1] > killed]
        assert around_kill, "no image request was in flight when the encoder died"
        print(
            f"{len(image_outcomes)} image requests, {len(around_kill)} around the kill:",
            [(round(t - killed, 2), round(d, 2), o if o == 200 else o[0]) for t, d, o in around_kill],
        )
        for _start, seconds, outcome in image_outcomes:
            if outcome != 200:
                assert isinstance(outcome, tuple) and outcome[0] == 503, outcome
                assert outcome[1]["code"] == "encoder_unavailable", outcome
                assert seconds < 3, f"an image request waited {seconds:.1f} s for its 503"
        assert image_outcomes[-1][2] == 200  # served by the restarted encoder
        assert "the encode service was killed by SIGKILL; restarting it in 1 s" in up.log.read_text()
        assert up.ctrl_c() == 0
    finally:
        up.kill()


def test_a_service_that_fails_to_start_stops_the_other(tmp_path):
    """The encoder cannot bind its job address: the launcher says which service failed, stops
    the language service (still starting) and exits 1 with nothing left."""
    config = tmp_path / "bad-listen.yaml"
    config.write_text(yaml.safe_dump({"encode": {"listen": "tcp://256.0.0.1:1"}}))
    up = Up(tmp_path, "--config", str(config))
    try:
        deadline = time.monotonic() + 60
        tree: set[int] = set()
        while up.proc.poll() is None and time.monotonic() < deadline:
            tree |= _tree(up.proc.pid)
            time.sleep(0.1)
        assert up.proc.wait(60) == 1
        log = up.log.read_text()
        assert "the encode service exited with code 1 while starting" in log, log
        assert tree and not wait_gone(tree), log
    finally:
        up.kill()


def test_services_die_with_a_killed_launcher(tmp_path):
    """SIGKILL leaves the launcher no chance to clean up; the kernel stops its children."""
    up, tree = Up(tmp_path), set()
    try:
        up.wait_serving()
        tree |= _tree(up.proc.pid)
        os.kill(up.proc.pid, signal.SIGKILL)  # the launcher alone, not its group
        up.proc.wait(10)
        # Each service drains for at most its shutdown_timeout_s (30 s) after the kernel's SIGTERM.
        assert not wait_gone(tree, timeout=45), up.log.read_text()
    finally:
        up.kill()
        for pid in tree:  # in their own sessions: the group kill above misses them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}"], "has no config.json"),
        (["--config", "{tmp}/bad.yaml"], "encode.workerz: unknown key"),
        (["--only", "language"], "--only language needs language.encoders"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(tmp_path, capsys, args, message):
    """In this process (no service starts): the launcher refuses before it starts anything."""
    (tmp_path / "bad.yaml").write_text("encode:\n  workerz: 2\n")
    assert main(["up", "--cache-dir", str(tmp_path / "cache"), *(a.format(tmp=tmp_path) for a in args)]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_each_services_settings_with_flags_over_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # a checkpoint directory, as far as planning looks
    config = Path(__file__).resolve().parents[1] / "configs" / "qwen3-vl-30b-a3b-2gpu.yaml"
    assert (
        main(
            [
                "up",
                "--dry-run",
                "--config",
                str(config),
                "--model",
                str(tmp_path),
                "--port",
                "9001",
                "--dtype",
                "float32",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    services = yaml.safe_load(capsys.readouterr().out)
    encode, language = services["encode"], services["language"]
    assert (encode["device"], language["device"]) == ("cuda:0", "cuda:1")
    assert encode["dtype"] == language["dtype"] == "float32" and language["port"] == 9001
    assert encode["model"] == language["model"] == str(tmp_path)
    assert language["encoders"] == [encode["listen"]] and encode["result_transport"] == "cuda_ipc"


def test_dry_run_lists_each_language_rank_with_its_gpu(tmp_path, capsys):
    """A GPU layout is checked on any machine: the dry run of the tp2 file starts nothing."""
    (tmp_path / "config.json").write_text("{}")
    config = Path(__file__).resolve().parents[1] / "configs" / "qwen3-vl-30b-a3b-tp2.yaml"
    assert main(["up", "--dry-run", "--config", str(config), "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# language rank 0: cuda:1\n# language rank 1: cuda:2\n" in out
    language = yaml.safe_load(out)["language"]  # the rank lines are comments: still the settings
    assert (language["device"], language["tensor_parallel_size"]) == ("cuda:1", 2)
    assert language["rank_devices"] == ["cuda:1", "cuda:2"]
    assert LanguageSettings(**language).devices_of_ranks() == ["cuda:1", "cuda:2"]


def test_dry_run_on_the_cpu_lists_cpu_ranks(tmp_path, capsys):
    config = tmp_path / "tp.yaml"
    config.write_text(yaml.safe_dump({"language": {"tensor_parallel_size": 2}}))
    assert main(["up", "--dry-run", "--config", str(config), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "# language rank 0: cpu\n# language rank 1: cpu\n" in capsys.readouterr().out


def test_the_banner_names_the_ranks_devices():
    config = load_deploy_config(None, device="cuda", gpus={"encode": 0, "language": [1, 2]})
    plan = make_plan(config, Path("/models/any"))
    text = banner(plan, "m", Path("/tmp/demo.png"))
    assert "m (2 tensor-parallel ranks on cuda:1, cuda:2, each expert split across them, bfloat16)" in text
    one = banner(make_plan(load_deploy_config(None, device="cuda"), Path("/models/any")), "m", Path("x.png"))
    assert "m (cuda:0, bfloat16)" in one


def _dry_run(capsys, tmp_path, *args: str) -> dict:
    assert main(["up", "--dry-run", "--cache-dir", str(tmp_path / "cache"), *args]) == 0
    services = yaml.safe_load(capsys.readouterr().out)
    for name in ("encode", "language"):  # free loopback ports, picked anew on every run
        services[name].pop("listen", None)
        services[name].pop("http_port", None)
        services[name]["encoders"] = None if name == "language" else services[name].get("encoders")
    return services


def test_no_flags_run_the_demo_file_and_a_dry_run_builds_and_shows_no_secret(tmp_path, capsys):
    demo = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    bare = _dry_run(capsys, tmp_path, "--api-key", "sekrit")
    assert bare == _dry_run(capsys, tmp_path, "--config", str(demo), "--api-key", "sekrit")
    encode, language = bare["encode"], bare["language"]
    assert (encode["workers"], language["max_model_len"], language["max_num_seqs"]) == (2, 4096, 16)
    assert language["api_key"] == "<set>"
    assert "sekrit" not in str(bare)
    assert not list((tmp_path / "cache").glob("tiny-*")), "a dry run wrote the demo checkpoint"


def test_one_encode_token_is_set_for_both_services(tmp_path, capsys):
    config = tmp_path / "token.yaml"
    config.write_text(yaml.safe_dump({"encode_token": "shared"}))
    assert main(["up", "--config", str(config), "--cache-dir", str(tmp_path / "cache"), "--dry-run"]) == 0
    services = yaml.safe_load(capsys.readouterr().out)
    assert services["encode"]["job_token"] == services["language"]["encoder_token"] == "<set>"
    # Set for one side only, they could never agree: refused by name.
    config.write_text(yaml.safe_dump({"language": {"encoder_token": "x"}}))
    assert main(["up", "--config", str(config), "--cache-dir", str(tmp_path / "cache"), "--dry-run"]) == 2
    assert "language.encoder_token is set for both services by the top-level encode_token" in capsys.readouterr().err


def test_an_encode_timeout_shorter_than_a_download_is_refused(tmp_path, capsys):
    config = tmp_path / "timeouts.yaml"
    config.write_text(yaml.safe_dump({"encode": {"fetch_total_timeout_s": 30}, "language": {"encode_timeout_s": 30}}))
    assert main(["up", "--config", str(config), "--cache-dir", str(tmp_path / "cache"), "--dry-run"]) == 2
    assert "language.encode_timeout_s (30 s) must exceed encode.fetch_total_timeout_s (30 s)" in capsys.readouterr().err
