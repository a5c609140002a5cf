"""The ``rerouting`` dispatcher: usage, unknown commands, ``--version``."""

from __future__ import annotations

import importlib.metadata

import rerouting
from rerouting.cli import main


def test_version_names_the_package_and_its_hosts(capsys):
    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"rerouting {importlib.metadata.version('rerouting')} (torch ")
    assert rerouting.__version__ == importlib.metadata.version("rerouting")  # one version, two places
    assert f"transformers {importlib.metadata.version('transformers')}" in line


def test_unknown_command_lists_the_commands(capsys):
    assert main(["audti"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'audti'" in err and "audit" in err and "--version" in err
