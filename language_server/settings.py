"""Settings of the language service (HTTP process and engine process), validated by pydantic.

Read from a YAML file (`--config`), with CLI flags overriding; unknown keys are errors so a
typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from transfer.registry import check_transport

Transport = Annotated[str, AfterValidator(check_transport)]  # a name transfer.registry knows


class LanguageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory (config.json, safetensors, tokenizer)")
    served_model_name: str | None = Field(None, description="name in /v1/models; default: the directory name")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = Field(None, description="if set, every /v1 request needs 'Authorization: Bearer <key>'")
    device: str = "cpu"
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")

    # Encoders: addresses of encode services' job receivers, and the transport to reach them.
    encoders: list[str] = Field(default_factory=list)
    transport: Transport = Field("zmq", description="transfer backend jobs go to encoders by")
    result_transport: Transport = Field(
        "zmq",
        description="backend results come back by: zmq, or cuda_ipc when the encoder runs on another GPU of this node",
    )
    # Where encode results come back: the engine process binds it. tcp://host:0 picks a port.
    result_address: str = "tcp://127.0.0.1:0"
    result_lease_mib: int = Field(
        64,
        ge=1,
        le=16384,
        description="cuda_ipc results: memory each encoder may fill ahead of this service (its lease of the "
        "receive region on this service's GPU, taken before the KV cache is sized; one lease per "
        "encoder, plus one so a restarted encoder need not wait for its old lease to expire). Results "
        "are taken between model steps, so this is how far an encoder can run ahead",
    )
    encoder_token: str | None = Field(
        None, description="shared secret sent with every encode job and health ping (the encoders' job_token)"
    )
    encode_timeout_s: float = Field(30.0, gt=0, description="per image job; then retry elsewhere or fail")
    encode_retries: int = Field(1, ge=0, description="extra attempts on other encoders")
    encoder_health_interval_s: float = Field(2.0, gt=0)

    # Several GPUs: one engine worker process per rank over torch.distributed (NCCL on GPUs,
    # gloo on CPUs); rank 0 schedules and samples (docs/ARCHITECTURE.md).
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="ranks the language model is split across (heads, experts, vocab)"
    )
    expert_parallel: bool = Field(
        False,
        description="false: every expert's intermediate dimension is split across the ranks; true: "
        "whole experts are partitioned across the ranks (attention stays tensor-parallel)",
    )
    rank_devices: list[str] = Field(
        default_factory=list,
        description="one device per rank, e.g. [cuda:1, cuda:2]; empty: `device` for rank 0 and "
        "the GPUs after it for the others (all cpu on the CPU)",
    )
    distributed_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a step's collective that waits this long for a rank (a hung rank) ends the service "
        "(start-up waits for the slowest rank's load instead)",
    )

    # Engine.
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1, description="KV cache blocks; default: from memory")
    kv_cache_memory_fraction: float = Field(0.8, gt=0, le=1, description="of free GPU memory, when on GPU")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one engine step")
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoding at once")
    chunk_size: int = Field(512, ge=1, description="most prompt tokens of one sequence per step")
    enable_prefix_caching: bool = True

    # Kernels and execution: each choice is logged in one line at start.
    attention_backend: str = Field(
        "auto",
        pattern="^(auto|torch|triton)$",
        description="attention kernels (and the norms beside them): triton (paged decode, "
        "flash varlen prefill, fused rotary + KV store), torch (SDPA references), or "
        "auto (triton on CUDA)",
    )
    moe_backend: str = Field(
        "auto",
        pattern="^(auto|torch|triton)$",
        description="routing and expert kernels: triton (grouped GEMMs), torch, or auto",
    )
    cuda_graphs: str = Field(
        "on",
        pattern="^(on|off|nocapture)$",
        description="replay decode-only steps from CUDA graphs (when both backends are triton); "
        "nocapture runs the graph path's static buffers eagerly, to tell capture bugs from "
        "padding bugs",
    )
    load_format: str = Field(
        "safetensors",
        pattern="^(safetensors|dummy)$",
        description="dummy: random weights of trained-like scale drawn on the device from "
        "config.json alone (no weight files; for benchmarks at real shapes)",
    )
    grammar_compile_timeout_s: float = Field(
        10.0,
        gt=0,
        description="structured outputs: the longest a constraint (JSON schema, regex, grammar, "
        "structural tag) may take to compile; past it the request ends with 400 "
        "grammar_too_complex. Compiles run beside the engine loop and repeated "
        "constraints come from a cache, so this bounds only pathological ones",
    )

    # HTTP process.
    tokenizer_workers: int = Field(
        4, ge=1, description="threads that parse bodies, render chat templates and tokenize, off the event loop"
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: how long running requests may finish "
        "(new ones get 503 with Retry-After); the rest then end with a 503",
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="origins browsers may call the API "
        "from (CORS), e.g. ['https://app.example.com'] or ['*']; empty: none",
    )
    reasoning_parser: str = Field(
        "auto",
        pattern="^(auto|qwen3|none)$",
        description="split <think>…</think> into reasoning_content: qwen3, none, or auto "
        "(qwen3 when the chat template thinks; logged at start)",
    )

    # Limits.
    max_model_len: int = Field(8192, ge=16, description="prompt (after image expansion) + completion tokens")
    max_images_per_request: int = Field(8, ge=0)
    max_queued_requests: int = Field(256, ge=1, description="beyond this, new requests get 429")
    max_image_url_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest data URL payload accepted")
    allowed_local_image_roots: list[str] = Field(default_factory=list, description="local image paths allowed under")

    @model_validator(mode="after")
    def _check_ranks(self) -> LanguageSettings:
        if self.rank_devices and len(self.rank_devices) != self.tensor_parallel_size:
            raise ValueError(
                f"rank_devices lists {len(self.rank_devices)} devices but tensor_parallel_size is "
                f"{self.tensor_parallel_size}: give one device per rank"
            )
        if self.rank_devices and self.rank_devices[0] != self.device:
            raise ValueError(
                f"device is {self.device} but rank_devices[0] is {self.rank_devices[0]}: rank 0 runs on "
                "`device`, so set both to the same device"
            )
        if len(set(self.rank_devices)) != len(self.rank_devices) and not all(d == "cpu" for d in self.rank_devices):
            raise ValueError(f"rank_devices {self.rank_devices} names a GPU twice: each rank needs its own")
        return self

    def devices_of_ranks(self) -> list[str]:
        """The device of each tensor-parallel rank, rank 0 first."""
        if self.rank_devices:
            return list(self.rank_devices)
        if self.tensor_parallel_size == 1 or not self.device.startswith("cuda"):
            return [self.device] * self.tensor_parallel_size
        first = int(self.device.partition(":")[2] or 0)
        return [f"cuda:{first + r}" for r in range(self.tensor_parallel_size)]

    @classmethod
    def load(cls, path: str | Path | None, **overrides: object) -> LanguageSettings:
        """File values, then every override that is not None."""
        values: dict[str, object] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of settings")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
