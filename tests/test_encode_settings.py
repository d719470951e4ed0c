"""Encode settings: YAML file, CLI flags on top, unknown keys refused; the CLI's wiring to them."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest

from encode_server.settings import SettingsError, load_settings
from splitvl.commands import encode as encode_command


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "encode.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_flag_overrides(tmp_path):
    config = write(
        tmp_path,
        """
model: /models/qwen3-vl
listen: tcp://0.0.0.0:5600
workers: 3
max_wait_ms: 2.5
url_allow_list: ["10.0.0.0/8", "127.0.0.1"]
allowed_local_roots: [/data/images]
""",
    )
    s = load_settings(config, {"workers": 5, "listen": None, "device": "cpu"})
    assert s.workers == 5  # a flag beats the file
    assert s.listen == "tcp://0.0.0.0:5600"  # an unset flag (None) leaves the file's value
    assert s.device == "cpu" and s.max_wait_ms == 2.5
    assert s.model == Path("/models/qwen3-vl")
    assert s.url_allow_list == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]
    assert s.allowed_local_roots == [Path("/data/images")]
    assert s.batch_token_budget == 16384 and s.transport == "zmq"  # defaults


def test_flags_alone_are_enough():
    s = load_settings(None, {"model": "/m", "listen": "tcp://127.0.0.1:1"})
    assert s.model == Path("/m") and s.cache_bytes > 0


@pytest.mark.parametrize(
    "text,needle",
    [
        ("model: /m\nlisten: tcp://x:1\nbatch_tokens: 10\n", "batch_tokens"),  # misspelt key
        ("model: /m\nlisten: tcp://x:1\nworkers: 0\n", "workers"),
        ("model: /m\nlisten: tcp://x:1\nurl_allow_list: [not-a-network]\n", "url_allow_list"),
        ("model: /m\n", "listen"),  # required
        ("- a list\n", "mapping"),
        ("model: [unclosed\n", "cannot read"),
    ],
)
def test_invalid_settings_name_the_problem(tmp_path, text, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(write(tmp_path, text), {})


def test_cli_flags_map_onto_settings(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    encode_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "encode",
            "--model",
            "/m",
            "--listen",
            "tcp://127.0.0.1:9",
            "--http-port",
            "0",
            "--workers",
            "2",
            "--batch-token-budget",
            "4096",
            "--max-wait-ms",
            "1",
            "--url-allow",
            "127.0.0.1",
            "--url-allow",
            "10.0.0.0/8",
            "--allow-local-root",
            str(tmp_path),
            "--cache-bytes",
            "0",
        ]
    )
    seen = []

    def fake_serve(settings):  # records what the service would have been started with
        seen.append(settings)
        return 0

    monkeypatch.setattr("encode_server.main.serve", fake_serve)
    assert args.func(args) == 0
    [s] = seen
    assert (s.http_port, s.workers, s.batch_token_budget, s.max_wait_ms, s.cache_bytes) == (0, 2, 4096, 1.0, 0)
    assert [str(n) for n in s.url_allow_list] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert s.allowed_local_roots == [tmp_path]


def test_cli_reports_bad_settings_without_starting(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    encode_command.register(parser.add_subparsers())
    config = write(tmp_path, "model: /m\nlisten: tcp://x:1\nmax_wait: 3\n")
    args = parser.parse_args(["encode", "--config", str(config)])
    assert args.func(args) == 2
    assert "max_wait" in capsys.readouterr().err
