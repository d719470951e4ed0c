"""Every subcommand has a useful `--help`: a description of what it does and help on every
option (or its list of choices); `splitvl --help` lists them all without importing torch."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from splitvl.cli import COMMAND_MODULES, build_parser, main
from splitvl.commands.language import settings_of


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


SUBCOMMANDS = [(path, parser) for path, parser in _parsers(build_parser()) if path]


def test_every_command_module_registers_a_subcommand():
    top_level = {path[0] for path, _ in SUBCOMMANDS}
    assert top_level == {name.replace("_", "-") for name in COMMAND_MODULES}
    assert "up" in top_level


@pytest.mark.parametrize("path, parser", SUBCOMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_help_says_what_the_command_does_and_what_each_option_means(path, parser):
    assert parser.description and len(parser.description) >= 40, f"splitvl {' '.join(path)}: no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"splitvl {' '.join(path)} {choice.dest}: no help"
        else:  # an option whose values are listed (choices) explains itself well enough
            assert action.help or action.choices, f"splitvl {' '.join(path)} {action.option_strings}: no help"
    parser.format_help()  # renders (a bad % in a help string fails here)


def test_top_level_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\nfrom splitvl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('heavy:', [m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "heavy: []" in out
    for name in COMMAND_MODULES:
        assert name.replace("_", "-") in out


def test_language_parallel_flags_set_the_settings_over_the_file(tmp_path):
    config = tmp_path / "language.yaml"
    config.write_text("model: /models/any\ntensor_parallel_size: 4\nexpert_parallel: true\n")
    parse = build_parser().parse_args
    from_file = settings_of(parse(["language", "--config", str(config)]))
    assert (from_file.tensor_parallel_size, from_file.expert_parallel) == (4, True)
    flags = ["--device", "cuda:1", "--tensor-parallel-size", "2", "--no-expert-parallel"]
    settings = settings_of(parse(["language", "--config", str(config), *flags]))
    assert (settings.tensor_parallel_size, settings.expert_parallel) == (2, False)
    assert settings.devices_of_ranks() == ["cuda:1", "cuda:2"]
    assert settings_of(parse(["language", "--model", "m", "--expert-parallel"])).expert_parallel


def test_generate_refuses_several_ranks_and_says_where_they_run(capsys):
    assert main(["generate", "--prompt", "hi", "--tensor-parallel-size", "2"]) == 2
    assert "splitvl language --tensor-parallel-size 2" in capsys.readouterr().err
