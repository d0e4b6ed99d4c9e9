"""What the day-one tests share: a real sshd for sftp repositories and remote syncs, and the
CLI with binary output."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import Cli
from tests.sshd import missing_tools

needs_sshd = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def raw(cli: Cli, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI with its output as bytes (dump, cat blob)."""
    return subprocess.run([sys.executable, "-m", "deltavault", *args], env=cli.env, capture_output=True)
