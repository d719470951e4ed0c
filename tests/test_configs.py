"""Every deployment file in configs/ passes the schema and resolves to valid settings for both
services; unknown and misplaced keys are errors that name the key; flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from encode_server.settings import EncodeSettings
from language_server.settings import LanguageSettings
from splitvl.deploy.config import (
    DeployConfigError,
    EncodeSection,
    LanguageSection,
    load_deploy_config,
)
from splitvl.deploy.plan import make_plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MODEL = Path("/models/any")  # planning never reads the model


def test_the_configs_named_by_the_issue_exist():
    assert {p.name for p in CONFIGS} >= {
        "tiny-cpu.yaml",
        "qwen3-vl-30b-a3b-1gpu.yaml",
        "qwen3-vl-30b-a3b-2gpu.yaml",
        "qwen3-vl-30b-a3b-multinode.yaml",
        "qwen3-vl-30b-a3b-tp2.yaml",
        "qwen3-vl-235b-a22b-8gpu.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_passes_the_schema_and_plans(path):
    config = load_deploy_config(path)
    only_modes = [None] if config.encode.listen is None else ["encode"]
    if config.language.encoders:
        only_modes.append("language")
    for only in only_modes:
        plan = make_plan(config, MODEL, only)
        for settings, cls in ((plan.encode, EncodeSettings), (plan.language, LanguageSettings)):
            if settings is not None:  # round trip: what the child process reads from its file
                assert cls(**settings.model_dump(mode="json")) == settings


def test_two_gpu_config_splits_the_gpus_and_copies_device_to_device():
    plan = make_plan(load_deploy_config(_config("2gpu")), MODEL)
    assert (plan.encode.device, plan.language.device) == ("cuda:0", "cuda:1")
    assert plan.encode.result_transport == plan.language.result_transport == "cuda_ipc"
    assert plan.language.encoders == [plan.encode.listen] and not plan.sequential


def test_one_gpu_config_starts_the_encoder_first():
    plan = make_plan(load_deploy_config(_config("1gpu")), MODEL)
    assert plan.encode.device == plan.language.device == "cuda:0" and plan.sequential


def test_tp2_config_splits_the_language_model_over_gpus_1_and_2():
    plan = make_plan(load_deploy_config(_config("tp2")), MODEL)
    assert plan.encode.device == "cuda:0" and plan.language.tensor_parallel_size == 2
    assert (plan.language.device, plan.language.rank_devices) == ("cuda:1", ["cuda:1", "cuda:2"])
    assert plan.encode.result_transport == "cuda_ipc" and not plan.sequential


def test_8gpu_config_runs_8_ranks_with_the_encoder_beside_rank_0():
    plan = make_plan(load_deploy_config(_config("8gpu")), MODEL)
    assert plan.language.rank_devices == [f"cuda:{gpu}" for gpu in range(8)]
    assert plan.encode.device == plan.language.device == "cuda:0" and plan.sequential
    assert plan.encode.result_transport == "zmq"  # one GPU holds the encoder and rank 0


def test_multinode_config_runs_one_service_per_node():
    config = load_deploy_config(_config("multinode"))
    encode = make_plan(config, MODEL, "encode")
    language = make_plan(config, MODEL, "language")
    assert encode.language is None and encode.encode.listen == "tcp://0.0.0.0:5600"
    assert language.encode is None and language.language.encoders == ["tcp://encode:5600"]


def test_a_gpu_list_places_one_language_rank_per_gpu(tmp_path):
    path = tmp_path / "tp.yaml"
    path.write_text("device: cuda\ngpus:\n  encode: 0\n  language: [3, 1]\n")
    config = load_deploy_config(path)
    assert config.language.tensor_parallel_size == 2  # taken from the list
    plan = make_plan(config, MODEL)
    assert plan.language.device == "cuda:3" and plan.language.rank_devices == ["cuda:3", "cuda:1"]
    assert plan.language.devices_of_ranks() == ["cuda:3", "cuda:1"] and not plan.sequential
    path.write_text("device: cuda\ngpus: {language: [1, 2]}\nlanguage: {tensor_parallel_size: 2}\n")
    assert make_plan(load_deploy_config(path), MODEL).language.rank_devices == ["cuda:1", "cuda:2"]


def test_one_gpu_index_and_a_rank_count_take_the_gpus_from_it_on():
    config = load_deploy_config(
        None, device="cuda", gpus={"encode": 2, "language": 1}, language={"tensor_parallel_size": 2}
    )
    plan = make_plan(config, MODEL)
    assert plan.language.rank_devices == ["cuda:1", "cuda:2"]
    # The encoder shares GPU 2 with rank 1, so it starts first (the KV cache is sized after it).
    assert plan.sequential


def test_ranks_on_the_cpu_need_no_gpu_list():
    plan = make_plan(load_deploy_config(None, language={"tensor_parallel_size": 2}), MODEL)
    assert (plan.language.device, plan.language.rank_devices) == ("cpu", [])
    assert plan.language.devices_of_ranks() == ["cpu", "cpu"]


def test_every_config_gives_each_language_rank_its_gpu():
    for path in CONFIGS:
        config = load_deploy_config(path)
        plan = make_plan(config, MODEL, None if config.encode.listen is None else "language")
        ranks = plan.language.devices_of_ranks()
        assert len(ranks) == plan.language.tensor_parallel_size and ranks[0] == plan.language.device, path.name
        if config.device == "cuda":
            assert ranks == [f"cuda:{gpu}" for gpu in config.language_gpus()], path.name


def test_flags_override_the_file():
    config = load_deploy_config(_config("2gpu"), model="/elsewhere", port=9001, dtype="float32", host="127.0.0.1")
    assert (config.model, config.port, config.dtype, config.host) == (Path("/elsewhere"), 9001, "float32", "127.0.0.1")
    with pytest.raises(DeployConfigError, match="cuda_ipc .* needs device: cuda"):
        load_deploy_config(_config("2gpu"), device="cpu")


@pytest.mark.parametrize(
    "text, message",
    [
        ("prot: 8000\n", "prot: unknown key"),
        ("encode:\n  batch_token_budgit: 1\n", "encode.batch_token_budgit: unknown key"),
        ("language:\n  max_model_length: 1\n", "language.max_model_length: unknown key"),
        ("gpus:\n  vision: 1\n", "gpus.vision: unknown key"),
        ("language:\n  port: 9000\n", "language.port is set for both services by the top-level port"),
        (
            "encode:\n  device: cuda:1\n",
            "encode.device is set for both services by the top-level device (and gpus.encode)",
        ),
        ("language:\n  max_model_len: 8\n", "language.max_model_len: Input should be greater than or equal to 16"),
        ("result_transport: carrier_pigeon\n", "result_transport 'carrier_pigeon' is not a transport"),
        ("device: tpu\n", "device: Input should be 'cpu' or 'cuda'"),
        ("- a list\n", "must hold a mapping"),
        (
            "gpus:\n  language: [1, 2]\nlanguage:\n  tensor_parallel_size: 4\n",
            "gpus.language lists 2 GPUs [1, 2], one per tensor-parallel rank, but language.tensor_parallel_size is 4",
        ),
        ("gpus:\n  language: [1, 2, 1]\n", "gpus.language: [1, 2, 1] lists GPU 1 more than once"),
        ("gpus:\n  language: []\n", "gpus.language: [] is neither a GPU index nor a list of 1 to 64 of them"),
        ("gpus:\n  language: [a]\n", "gpus.language: ['a'] is neither a GPU index"),
        (
            "language:\n  rank_devices: [cuda:0]\n",
            "language.rank_devices is set by the top-level gpus.language (a list of GPU indices",
        ),
    ],
)
def test_bad_files_name_the_bad_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DeployConfigError) as info:
        load_deploy_config(path)
    assert message in str(info.value)


def test_sections_reuse_every_service_setting():
    """A field added to a service's settings is configurable in a deployment file at once:
    each is either in its section or set by the top level."""
    top_level = {"model", "device", "dtype", "transport", "result_transport"}
    assert set(EncodeSection.model_fields) | top_level | {"job_token"} == set(EncodeSettings.model_fields)
    owned = {"host", "port", "encoder_token", "api_key", "rank_devices"}
    assert set(LanguageSection.model_fields) | top_level | owned == set(LanguageSettings.model_fields)
    # Same definitions, not copies: descriptions and bounds come along.
    assert (
        EncodeSection.model_fields["batch_token_budget"].description
        == EncodeSettings.model_fields["batch_token_budget"].description
    )


def test_no_model_and_no_file_is_the_tiny_cpu_demo():
    config = load_deploy_config(None)
    assert (config.model, config.device, config.resolved_dtype, config.port) == (None, "cpu", "float32", 8000)
    assert load_deploy_config(None, device="cuda").resolved_dtype == "bfloat16"


def _config(suffix: str) -> Path:
    [path] = [p for p in CONFIGS if p.stem.endswith(suffix)]
    return path
