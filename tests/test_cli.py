"""The flexmoe command line: usage, --version, and the commands that belong to the application."""

import pytest

import flexmoe
from flexmoe.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flexmoe {flexmoe.__version__}"


def test_help_lists_the_library_commands_and_where_the_application_is(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for command in ("checkpoint", "extract", "infer", "helloworld"):
        assert f"\n  {command} " in out
    assert "flexmoe-mt" in out


@pytest.mark.parametrize("command", ["train", "translate"])
def test_application_commands_point_to_flexmoe_mt(command, capsys):
    assert main([command, "--config", "x.toml"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f"unknown command {command!r}" in line and "flexmoe-mt" in line


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: flexmoe <command>" in capsys.readouterr().err
