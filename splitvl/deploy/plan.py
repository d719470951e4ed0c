"""From a deployment config to what each service runs with: its own settings (the same objects
`splitvl encode --config` and `splitvl language --config` load), the address that joins them,
and the URLs the launcher polls for health."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from encode_server.settings import EncodeSettings
from language_server.settings import LanguageSettings
from splitvl.deploy.config import DeployConfig, DeployConfigError

Only = Literal["encode", "language"] | None
_ANY_HOST = ("0.0.0.0", "::", "*", "")
_ENCODE_SLACK_S = 5.0  # an encode job's time beyond its download: queueing, preprocessing, the tower


@dataclass(frozen=True)
class Plan:
    encode: EncodeSettings | None
    language: LanguageSettings | None
    # Start the encoder and wait for it before the language service (see make_plan).
    sequential: bool

    @property
    def encode_health_url(self) -> str:
        assert self.encode is not None
        return f"http://{local_host(self.encode.http_host)}:{self.encode.http_port}/health"

    @property
    def language_url(self) -> str:
        assert self.language is not None
        return f"http://{local_host(self.language.host)}:{self.language.port}"


def make_plan(config: DeployConfig, model: Path, only: Only = None, served_model_name: str | None = None) -> Plan:
    """Both services (only=None) joined on loopback, or one of them for a multi-node deployment.

    served_model_name: the API's model name unless the language section sets one.
    """
    encode = None if only == "language" else _encode_settings(config, model, local=only is None)
    language = None if only == "encode" else _language_settings(config, model, encode, served_model_name)
    if (
        encode is not None
        and language is not None
        and language.encode_timeout_s < encode.fetch_total_timeout_s + _ENCODE_SLACK_S
    ):
        raise DeployConfigError(
            f"language.encode_timeout_s ({language.encode_timeout_s:g} s) must exceed encode.fetch_total_timeout_s "
            f"({encode.fetch_total_timeout_s:g} s) by at least {_ENCODE_SLACK_S:g} s: a slow image URL must fail as "
            "the client's error before the language service gives the encoder up for dead"
        )
    # Two services on one GPU (the encoder's and any language rank's): the language engine sizes
    # its KV cache from the memory free when it starts, so the encoder must have loaded its
    # weights and run its probe by then.
    sequential = (
        encode is not None
        and language is not None
        and config.device == "cuda"
        and config.gpus.encode in config.language_gpus()
    )
    return Plan(encode, language, sequential)


def _encode_settings(config: DeployConfig, model: Path, local: bool) -> EncodeSettings:
    values = config.encode.model_dump(exclude_unset=True)
    if local:
        # Free loopback ports unless the file names them, so two launchers never collide.
        if values.get("listen") is None:
            values["listen"] = f"tcp://127.0.0.1:{free_port()}"
        if "http_port" not in values:
            values["http_port"] = free_port()
    elif values.get("listen") is None:
        raise DeployConfigError(
            "--only encode needs encode.listen: the address language services send jobs to, e.g. tcp://0.0.0.0:5600"
        )
    return EncodeSettings(
        **values,
        model=model,
        device=config.service_device("encode"),
        dtype=config.resolved_dtype,
        transport=config.transport,
        result_transport=config.result_transport,
        job_token=config.encode_token,
    )


def _language_settings(
    config: DeployConfig, model: Path, encode: EncodeSettings | None, served_model_name: str | None
) -> LanguageSettings:
    values = config.language.model_dump(exclude_unset=True)
    encoders = list(config.language.encoders)
    if encode is not None:
        encoders.insert(0, reachable(encode.listen))
    elif not encoders:
        raise DeployConfigError(
            "--only language needs language.encoders: the encode services' addresses, e.g. [tcp://vision-node:5600]"
        )
    values["encoders"] = encoders
    if values.get("served_model_name") is None and served_model_name is not None:
        values["served_model_name"] = served_model_name
    return LanguageSettings(
        **values,
        model=str(model),
        host=config.host,
        port=config.port,
        device=config.service_device("language"),
        rank_devices=config.rank_devices(),
        dtype=config.resolved_dtype,
        transport=config.transport,
        result_transport=config.result_transport,
        encoder_token=config.encode_token,
        api_key=config.api_key,
    )


def free_port() -> int:
    """A port free now on loopback (another process could take it before the service binds it;
    on a launcher's own host that race is rare enough, and the service then fails loudly)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_host(host: str) -> str:
    """Where this host reaches a server bound to `host` (a wildcard bind answers on loopback)."""
    return "127.0.0.1" if host in _ANY_HOST else host


def reachable(listen: str) -> str:
    """The address a local client connects to for a bound `listen` address."""
    scheme, sep, rest = listen.partition("://")
    if scheme != "tcp" or not sep:
        return listen
    host, _, port = rest.rpartition(":")
    return f"tcp://{local_host(host.strip('[]'))}:{port}"
