"""README.md stays true to the repo: the blocks scripts/check_readme.sh runs are there and in
the expected shape, and every command, config and path it names exists. (Running the blocks
takes minutes; CI does it with scripts/check_readme.sh.)"""

from __future__ import annotations

import re
from pathlib import Path

from splitvl.cli import COMMAND_MODULES

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CHECKED = re.findall(r"^<!-- check: ([a-z]+) -->\n```[a-z]*\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements/cpu.txt -e "


def _blocks(kind: str) -> list[str]:
    return [body for k, body in CHECKED if k == kind]


def test_the_first_command_sets_up_and_serves_with_splitvl_up():
    [serve] = _blocks("serve")
    assert serve.strip() == SETUP + ". && splitvl up"
    assert README.index(serve) < min(README.index(body) for _, body in CHECKED if body != serve)


def test_the_second_command_sets_up_and_tests():
    [test] = _blocks("test")
    lint = "ruff check . && ruff format --check . && "
    assert test.strip() == SETUP + "'.[test]' && " + lint + "python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements/cpu.txt -e '.[test]'" in ci and "python -m pytest -q" in ci
    assert "ruff check ." in ci and "ruff format --check ." in ci
    assert "scripts/check_readme.sh" in ci


def test_the_requests_use_an_image_through_curl_and_the_openai_client():
    requests = "\n".join(_blocks("request"))
    assert "curl" in requests and "image_url" in requests and "/v1/chat/completions" in requests
    [python] = _blocks("python")
    compile(python, "README.md", "exec")
    assert "from openai import OpenAI" in python and "image_url" in python


def test_every_command_the_readme_names_exists():
    named = set(re.findall(r"`splitvl ([a-z-]+)", README)) | set(re.findall(r"&& splitvl ([a-z-]+)", README))
    assert named <= {name.replace("_", "-") for name in COMMAND_MODULES}, named


def test_every_config_is_documented_and_every_documented_path_exists():
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert configs == set(re.findall(r"configs/([\w.-]+\.yaml)", README))
    for path in set(re.findall(r"\b((?:docs|docker|scripts|benchmarks|requirements)/[\w./-]*\w)", README)):
        assert (REPO / path).exists(), path
