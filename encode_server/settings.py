"""The encode service's settings: one pydantic model, loadable from YAML, CLI flags on top.

Unknown keys are errors (a misspelt limit must not silently fall back to its default).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from transfer.registry import check_transport

MiB = 1 << 20
Transport = Annotated[str, AfterValidator(check_transport)]  # a name transfer.registry knows


class SettingsError(ValueError):
    """The settings file or flags are invalid; the message names each bad key."""


class EncodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- where and what
    model: Path = Field(description="checkpoint directory; only model.visual.* is read")
    listen: str = Field(description="transport address jobs arrive at, e.g. tcp://0.0.0.0:5600")
    transport: Transport = Field("zmq", description="transfer backend jobs arrive by")
    result_transport: Transport = Field(
        "zmq",
        description="transfer backend results leave by: zmq, or cuda_ipc when the language model runs on "
        "another GPU of this node (results then stay on the GPU and are copied device to device)",
    )
    service_id: str | None = Field(None, description="name in health pongs; default host:pid")
    http_host: str = Field("127.0.0.1", description="address of the /health and /metrics port")
    http_port: int = Field(8601, ge=0, le=65535, description="0 picks a free port")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vision weights and output dtype; auto = the checkpoint's"
    )

    # --- batching and concurrency
    batch_token_budget: PositiveInt = Field(
        16384,
        description="most patches (vision tokens before the 2x2 merge) in one forward; "
        "a larger single image still runs, alone",
    )
    max_wait_ms: NonNegativeFloat = Field(5.0, description="longest an image waits for others to share its forward")
    workers: PositiveInt = Field(
        8, description="threads that decode and preprocess images (downloads run on fetch_workers)"
    )
    max_pending_jobs: PositiveInt = Field(
        1024, description="jobs accepted and not yet answered; more are refused as overloaded"
    )
    send_timeout_s: PositiveFloat = Field(30.0, description="how long a result may wait for a slow language service")
    shutdown_timeout_s: PositiveFloat = Field(
        30.0, description="graceful shutdown finishes in-flight jobs for at most this long"
    )

    # --- cache
    cache_bytes: NonNegativeInt = Field(2048 * MiB, description="LRU budget for results; 0 = off")

    # --- limits on what clients send
    max_image_bytes: PositiveInt = Field(32 * MiB, description="largest encoded image accepted")
    max_decoded_pixels: PositiveInt = Field(
        64 * MiB, description="largest width*height decoded (checked from the header first)"
    )
    max_pixels_limit: PositiveInt | None = Field(
        None, description="highest min_pixels/max_pixels a job may ask for; default: the checkpoint's max_pixels"
    )

    # --- sources
    url_allow_list: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="networks URLs may reach although private, loopback, "
        "link-local or reserved (public addresses are always allowed)",
    )
    allowed_local_roots: list[Path] = Field(
        default_factory=list, description="directories local paths may be read from; empty = none"
    )
    reply_to_allow_list: list[str] | None = Field(
        None,
        description="shell-style patterns of the addresses results and health pongs may be sent to (a "
        "job's reply_to), e.g. ['tcp://10.0.0.*:*', 'tcp://language:*']. A job or ping naming any other address "
        "is dropped unanswered (logged and counted), so nobody can make this service connect to hosts of their "
        "choosing. Default: this host's own addresses (loopback, its host name and addresses, ipc://) or, with "
        "job_token set, any address",
    )
    job_token: str | None = Field(
        None,
        description="a shared secret every job and health ping must carry (the language service's "
        "encoder_token); for language services on other hosts. It keeps strangers out on a private network; it "
        "is not encryption",
    )
    fetch_workers: PositiveInt = Field(
        16,
        description="threads that download http(s) images (apart from the workers, so slow URLs never hold "
        "back inline images)",
    )
    fetch_per_host: PositiveInt = Field(4, description="most downloads from one host at once; the rest queue")
    fetch_connect_timeout_s: PositiveFloat = 3.0
    fetch_read_timeout_s: PositiveFloat = Field(5.0, description="longest silence while downloading")
    fetch_total_timeout_s: PositiveFloat = Field(
        10.0,
        description="a job's whole download from its arrival, queueing and redirects included (stops "
        "slow-drip servers); keep it well under the language service's encode_timeout_s, so a slow URL is "
        "the client's error (400) and never looks like a dead encoder",
    )
    fetch_max_redirects: NonNegativeInt = 3

    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_settings(config_file: str | Path | None, overrides: Mapping[str, Any]) -> EncodeSettings:
    """The YAML file's values, then every override that is not None (CLI flags left unset)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read encode settings {path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{path} must hold a mapping of setting: value, not {type(loaded).__name__}")
        values.update(loaded or {})
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return EncodeSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in exc.errors())
        where = f" (from {config_file} and flags)" if config_file else ""
        raise SettingsError(f"invalid encode settings{where}: {problems}") from None
