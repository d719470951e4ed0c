"""The deployment file `splitvl up --config` reads: top-level choices plus two sections.

    model: /models/Qwen3-VL-30B-A3B-Instruct    # top level: what both services must agree on,
    device: cuda                                # and what the launcher wires itself
    encode:   {batch_token_budget: 32768}       # any EncodeSettings field (encode_server/settings.py)
    language: {max_model_len: 32768}            # any LanguageSettings field (language_server/settings.py)

`gpus.language` is one GPU index (its tensor-parallel ranks take it and the GPUs after it) or a
list of indices, one per rank, rank 0 first; a list sets `language.tensor_parallel_size`.

The sections reuse the services' own field definitions (types, bounds, defaults, descriptions),
so a setting added to a service is configurable here the day it exists. A field the top level
owns (model, device, dtype, transports, the public host and port) is refused in a section with a
message that names the top-level key, so the two services can never disagree on it. Unknown keys
are errors everywhere: a misspelt limit must not silently keep its default.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    ValidationError,
    ValidatorFunctionWrapHandler,
    create_model,
    field_validator,
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
        "rank_devices": "gpus.language (a list of GPU indices, one per tensor-parallel rank)",
    },
}
# Owned keys that place processes rather than being shared by both services.
_PLACEMENT = {"rank_devices"}


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
    """With device: cuda, the GPU index (as this process sees them) each service runs on; for the
    language service one index, or a list of them: one per tensor-parallel rank, rank 0 first."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    encode: NonNegativeInt = 0
    language: NonNegativeInt | Annotated[list[NonNegativeInt], Field(min_length=1, max_length=64)] = 0

    @field_validator("language", mode="wrap")
    @classmethod
    def _one_gpu_per_rank(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> int | list[int]:
        try:
            gpus = handler(value)
        except ValidationError:  # one message, not one per member of the union
            raise ValueError(
                f"{value!r} is neither a GPU index nor a list of 1 to 64 of them (one per "
                "tensor-parallel rank), e.g. 1 or [1, 2]"
            ) from None
        if isinstance(gpus, list):
            twice = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
            if twice:
                named = f"GPU{'s' if len(twice) > 1 else ''} {', '.join(map(str, twice))}"
                raise ValueError(
                    f"{gpus} lists {named} more than once: each tensor-parallel rank needs a GPU of its own"
                )
        return gpus


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
                    whose = "" if key in _PLACEMENT else "for both services "
                    raise ValueError(
                        f"{section}.{key} is set {whose}by the top-level {owned[key]}; "
                        f"move it out of the {section}: section"
                    )
        return values

    @model_validator(mode="before")
    @classmethod
    def _ranks_from_the_gpu_list(cls, values: Any) -> Any:
        """A list in gpus.language and no language.tensor_parallel_size: one rank per GPU listed."""
        if not isinstance(values, dict):
            return values
        gpus, language = values.get("gpus"), values.get("language", {})
        listed = gpus.get("language") if isinstance(gpus, dict) else None
        language = {} if language is None else language
        if (
            isinstance(listed, list)
            and listed
            and isinstance(language, dict)
            and "tensor_parallel_size" not in language
        ):
            values = {**values, "language": {**language, "tensor_parallel_size": len(listed)}}
        return values

    @model_validator(mode="after")
    def _check_ranks(self) -> DeployConfig:
        gpus, size = self.gpus.language, self.language.tensor_parallel_size
        if isinstance(gpus, list) and len(gpus) != size:
            raise ValueError(
                f"gpus.language lists {len(gpus)} GPU{'s' if len(gpus) > 1 else ''} {gpus}, one per "
                f"tensor-parallel rank, but language.tensor_parallel_size is {size}: make them agree, or "
                "leave language.tensor_parallel_size out (the list's length is taken)"
            )
        return self

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

    def language_gpus(self) -> list[int]:
        """The GPU index of each language rank, rank 0 first: the list given, or the GPUs from
        the one given on, one per language.tensor_parallel_size."""
        if isinstance(self.gpus.language, list):
            return list(self.gpus.language)
        return [self.gpus.language + rank for rank in range(self.language.tensor_parallel_size)]

    def service_device(self, service: Literal["encode", "language"]) -> str:
        """Where the service runs: the encoder's GPU, language rank 0's (cpu on the CPU)."""
        if self.device != "cuda":
            return "cpu"
        return f"cuda:{self.gpus.encode if service == 'encode' else self.language_gpus()[0]}"

    def rank_devices(self) -> list[str]:
        """language.rank_devices: each rank's GPU with device: cuda. Empty on the CPU, where the
        language settings make every rank a CPU process."""
        return [f"cuda:{gpu}" for gpu in self.language_gpus()] if self.device == "cuda" else []


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
