"""What `splitvl up` prints once its services are healthy (where they are and a request to try),
and where each language rank runs (also under `--dry-run`)."""

from __future__ import annotations

from pathlib import Path

from language_server.settings import LanguageSettings
from splitvl.deploy.plan import Plan


def banner(plan: Plan, model_name: str, image: Path) -> str:
    lines = [""]
    if plan.encode is not None:
        lines.append(
            f"encode service ready: jobs at {plan.encode.listen}, health at {plan.encode_health_url} "
            f"({plan.encode.device}, {plan.encode.dtype})"
        )
    if plan.language is not None:
        url = plan.language_url
        lines += [
            (
                f"language service ready: {model_name} ({_where(plan.language)}, {plan.language.dtype}), "
                f"encoders {', '.join(plan.language.encoders)}"
            ),
            "",
            f"  OpenAI API:  {url}/v1",
            f"  health:      {url}/health",
            "",
            "Try an image chat:",
            "",
            _curl(url, model_name, image),
        ]
    lines += ["", "Ctrl-C stops " + ("both services." if plan.encode and plan.language else "the service."), ""]
    return "\n".join(lines) + "\n"


def rank_lines(language: LanguageSettings) -> list[str]:
    """One line per tensor-parallel rank: `language rank R: DEVICE`."""
    return [f"language rank {rank}: {device}" for rank, device in enumerate(language.devices_of_ranks())]


def _where(language: LanguageSettings) -> str:
    devices = language.devices_of_ranks()
    if len(devices) == 1:
        return devices[0]
    experts = "whole experts per rank" if language.expert_parallel else "each expert split across them"
    return f"{len(devices)} tensor-parallel ranks on {', '.join(devices)}, {experts}"


def _curl(url: str, model_name: str, image: Path) -> str:
    # A data URL built by the shell, so the example works offline; any https:// image URL works too.
    return (
        f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d @- <<EOF\n"
        f'{{"model": "{model_name}", "max_tokens": 32, "messages": [{{"role": "user", "content": [\n'
        f'  {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,$(base64 -w0 {image})"}}}},\n'
        '  {"type": "text", "text": "What is in this image?"}]}]}\n'
        "EOF"
    )
