"""The CLI imports only the command it runs (cli/main.py build_parser): all 25 command
modules took 0.1-0.2 s of CPU at the start of every run; help and errors are unchanged."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from deltavault.cli import main as cli_main


def test_only_the_named_command_is_imported() -> None:
    code = ("import sys; from deltavault.cli.main import build_parser; "
            "a = build_parser(['-r', 'x', 'restore', 'latest', '--target', 't'])"
            ".parse_args(['-r', 'x', 'restore', 'latest', '--target', 't']); "
            "print(a.command, callable(a.func), sorted(m for m in sys.modules if m.startswith('deltavault.cli.cmd_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["restore", "True"]
    assert "'deltavault.cli.cmd_restore']" in out[-1] and "cmd_sync" not in out[-1] and "cmd_backup" not in out[-1]


def test_the_top_level_help_and_the_choices_are_every_command() -> None:
    whole, one = cli_main.build_parser(), cli_main.build_parser(["restore"])
    assert "restore a snapshot" in whole.format_help() and "back up files" in whole.format_help()
    choices = [set(next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices)
               for p in (whole, one)]
    assert "sync-agent" in choices[0] and "restore" in choices[1] and len(choices[1]) >= len(cli_main._commands())


def test_a_command_named_unlike_its_module_is_found() -> None:
    # cmd_agent registers sync-agent: with "restore" also a word of argv (here a repository
    # path), only cmd_restore is imported first, sync-agent is no choice then, and the
    # arguments are parsed again with every command.
    a = cli_main._parse(["-r", "restore", "sync-agent"])
    assert a.command == "sync-agent" and a.func.__name__ == "run_agent"
    a = cli_main._parse(["-r", "restore", "snapshots"])
    assert a.command == "snapshots" and callable(a.func)
    with pytest.raises(SystemExit) as exc:
        cli_main._parse(["-r", "restore", "snapshots", "--no-such-option"])
    assert exc.value.code == 2


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["-r", "x", "restorr", "latest"])
    assert exc.value.code == 2
    assert "invalid choice: 'restorr'" in capsys.readouterr().err


def test_help_of_one_command_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["restore", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.count("usage: deltavault restore") == 1


def test_rich_is_imported_only_for_a_terminal() -> None:
    """rich's import (25-50 ms) is on a command's path only when it draws bars."""
    code = ("import argparse, io, sys; from deltavault.cli.common import Context; "
            "r = Context(argparse.Namespace(), json=False, quiet=False, stderr=io.StringIO()).reporter(); "
            "print(type(r).__name__, 'rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["QuietReporter", "False"]
