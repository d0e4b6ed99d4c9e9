"""--limit-upload and --limit-download: the token bucket, and real transfers held to the
rate: a backup to and a restore from an sftp repository, a push and a pull sync."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltavault.backends.throttle import TokenBucket
from tests.conftest import Cli
from tests.integration.dayone.conftest import needs_sshd
from tests.seaweed import Seaweed
from tests.sshd import Server
from tests.treeutil import manifest


def test_the_bucket_holds_the_average_rate() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    b = TokenBucket(1000, burst=0.5, clock=lambda: now[0], sleep=sleep)
    for _ in range(20):
        b.take(500)  # 10,000 bytes at 1,000 a second, 500 of credit to start with
    assert 9.4 <= now[0] <= 9.6
    now[0] += 100  # idle: the credit saved is capped at half a second
    before = now[0]
    b.take(1500)
    assert now[0] - before == pytest.approx(1.0)


def test_bad_rates_are_usage_errors(cli: Cli) -> None:
    for bad in ("0", "-5", "fast"):
        r = cli("--limit-upload", bad, "snapshots")
        assert r.returncode == 2 and "not a rate" in r.stderr, r.stderr



@needs_sshd
def test_backup_and_restore_over_sftp_keep_to_the_limits(tmp_path: Path, cli: Cli, server: Server) -> None:
    cli.env.update(DELTAVAULT_REPOSITORY=server.url(tmp_path / "remote" / "repo"),
                   DELTAVAULT_SSH_CONFIG=str(server.ssh_config))
    _backup_and_restore_at_limits(tmp_path, cli)


def test_backup_and_restore_on_s3_keep_to_the_limits(tmp_path: Path, cli: Cli, seaweed: Seaweed) -> None:
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=seaweed.url(seaweed.new_bucket(), "repo"))
    _backup_and_restore_at_limits(tmp_path, cli)


def _backup_and_restore_at_limits(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(3 << 20))
    assert cli("init").returncode == 0
    t0 = time.monotonic()
    r = cli("--json", "--limit-upload", "1M", "backup", str(src))  # 1 MiB/s
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took >= 2.4, took  # 3 MiB at 1 MiB/s, less half a second of credit
    t0 = time.monotonic()
    r = cli("--limit-download", "2048", "restore", "latest", "--target", str(tmp_path / "out"))  # KiB/s
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took >= 1.0, took  # 3 MiB at 2 MiB/s
    assert manifest(tmp_path / "out" / "src") == manifest(src)


@needs_sshd
def test_sync_with_another_host_keeps_to_the_limits(tmp_path: Path, server: Server) -> None:
    path = os.environ.get("PYTHONPATH")
    remote = (f"env PYTHONPATH={path} " if path else "") + f"{sys.executable} -m deltavault"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env["DELTAVAULT_SSH_CONFIG"] = str(server.ssh_config)
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(3 << 20))

    def sync(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "deltavault", "sync", "--remote-command", remote, *args],
                           env=env, capture_output=True, text=True, timeout=300)
        return time.monotonic() - t0, p

    took, p = sync("--limit-upload", "1M", str(src), f"dvtest:{tmp_path / 'mirror'}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert took >= 2.4, took
    assert (tmp_path / "mirror" / "blob").read_bytes() == (src / "blob").read_bytes()
    took, p = sync("--limit-download", "1M", f"dvtest:{src}", str(tmp_path / "pulled"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert took >= 2.4, took
    assert (tmp_path / "pulled" / "blob").read_bytes() == (src / "blob").read_bytes()
    took, p = sync("--limit-upload", "1M", str(src), str(tmp_path / "local-copy"))
    assert p.returncode == 0 and "this one is local" in p.stderr
