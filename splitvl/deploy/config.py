"""The deployment file `splitvl up --config` reads: top-level choices plus two sections.

    model: /models/Qwen3-VL-30B-A3B-Instruct    # top level: what both services must agree on,
    device: cuda                                # and what the launcher wires itself
    encode:   {batch_token_budget: 32768}       # any EncodeSettings field (encode_server/settings.py)
    language: {max_model_len: 32768}            # any LanguageSettings field (language_server/settings.py)

The sections reuse the services' own field definitions (types, bounds, defaults, descriptions),
so a setting added to a service is configurable here the day it exists. A field the top level
owns (model, device, dtype, transports, the public host and port) is refused in a section with a
message that names the top-level key, so the two services can never disagree on it. Unknown keys
are errors everywhere: a misspelt limit must not silently keep its default.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    ValidationError,
    create_model,
    model_validator,
)

from encode_server.settings import EncodeSettings
from language_server.settings import LanguageSettings
from transfer.registry import transport_names

# Section field -> the top-level key that sets it.
_OWNED = {
    "encode": {
        "model": "model",
        "device": "device (and gpus.encode)",
        "dtype": "dtype",
        "transport": "transport",
        "result_transport": "result_transport",
        "job_token": "encode_token",
    },
    "language": {
        "model": "model",
        "device": "device (and gpus.language)",
        "dtype": "dtype",
        "transport": "transport",
        "result_transport": "result_transport",
        "host": "host",
        "port": "port",
        "encoder_token": "encode_token",
        "api_key": "api_key",
    },
}


class DeployConfigError(ValueError):
    """The file or the flags are invalid; the message names every bad key."""


def _section(settings: type[BaseModel], owned: dict[str, str]) -> type[BaseModel]:
    """`settings`'s fields less the owned ones; a required field becomes optional (None), for the
    launcher fills it (the encode service's `listen`: a free loopback port unless given)."""
    fields: dict[str, Any] = {}
    for name, info in settings.model_fields.items():
        if name in owned:
            continue
        if info.is_required():
            fields[name] = (info.annotation | None, Field(None, description=info.description))
        else:
            fields[name] = (info.annotation, copy(info))
    return create_model(f"{settings.__name__}Section", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


EncodeSection = _section(EncodeSettings, _OWNED["encode"])
LanguageSection = _section(LanguageSettings, _OWNED["language"])


class GpuPlacement(BaseModel):
    """With device: cuda, the GPU index (as this process sees them) each service runs on."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    encode: NonNegativeInt = 0
    language: NonNegativeInt = 0


class DeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path | None = Field(
        None,
        description="checkpoint directory; none: a tiny random checkpoint, "
        "built once into the cache directory (a demo, not a model)",
    )
    host: str = Field("127.0.0.1", description="address /health and /v1 listen on; 0.0.0.0 for every interface")
    port: int = Field(8000, ge=1, le=65535, description="port of /health and /v1")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] | None = Field(None, description="default: float32 on cpu, bfloat16 on cuda")
    gpus: GpuPlacement = Field(default_factory=GpuPlacement)
    transport: str = Field("zmq", description="transfer backend encode jobs travel by")
    result_transport: str = Field(
        "zmq",
        description="transfer backend encode results travel by: zmq (tcp, any two "
        "hosts), cuda_ipc (two GPUs of one node)",
    )
    api_key: str | None = Field(None, description="if set, every /v1 request needs 'Authorization: Bearer <key>'")
    encode_token: str | None = Field(
        None,
        description="a shared secret the language service sends with every "
        "encode job and the encode service requires: for encoders on other hosts "
        "(same-host reply addresses are trusted without it)",
    )
    startup_timeout_s: PositiveFloat = Field(
        900.0, description="how long the services may take to become healthy (reading ~62 GB of weights takes minutes)"
    )
    encode: EncodeSection = Field(default_factory=EncodeSection)  # type: ignore[valid-type]
    language: LanguageSection = Field(default_factory=LanguageSection)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _refuse_owned_keys(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for section, owned in _OWNED.items():
                given = values.get(section)
                for key in sorted(set(given or {}) & set(owned) if isinstance(given, dict) else ()):
                    raise ValueError(
                        f"{section}.{key} is set for both services by the top-level {owned[key]}; "
                        f"move it out of the {section}: section"
                    )
        return values

    @model_validator(mode="after")
    def _check_transports(self) -> DeployConfig:
        for key in ("transport", "result_transport"):
            if getattr(self, key) not in transport_names():
                raise ValueError(f"{key} {getattr(self, key)!r} is not a transport; choose one of {transport_names()}")
        if self.result_transport == "cuda_ipc" and self.device != "cuda":
            raise ValueError("result_transport cuda_ipc copies GPU to GPU and needs device: cuda; use zmq on the CPU")
        return self

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device == "cuda" else "float32")

    def service_device(self, service: Literal["encode", "language"]) -> str:
        return f"cuda:{getattr(self.gpus, service)}" if self.device == "cuda" else "cpu"


def load_deploy_config(path: str | Path | None, **overrides: Any) -> DeployConfig:
    """The file's values (if any), then every top-level override that is not None (CLI flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DeployConfigError(f"cannot read {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DeployConfigError(f"{path} must hold a mapping of key: value, not {type(loaded).__name__}")
        values.update(loaded or {})
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return DeployConfig(**values)
    except ValidationError as exc:
        where = f"{path} (with the flags given)" if path else "the flags given"
        raise DeployConfigError(f"invalid deployment config in {where}:\n" + _describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"]))
        what = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {what}" if where else f"  {what}")
    return "\n".join(lines)
