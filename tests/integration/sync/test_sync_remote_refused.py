"""Sync to another host that ssh cannot get through, or whose agent cannot run: each
failure is one line of ssh's own message with an exit code of its own (19 refused, 20 not
reached or not trusted, 2 this host's ssh configuration, 17 no agent there), never the far
end's words taken for ssh's."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.integration.sync.conftest import REMOTE, dv, write
from tests.integration.sync.test_sync_remote import push, server
from tests.ports import free_port
from tests.sshd import Server, missing_tools

pytestmark = [needs_root(), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

__all__ = ["server"]  # the fixture, shared with test_sync_remote


def test_connection_and_agent_failures_are_clear(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f", b"x")
    env = {"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}
    p = dv("sync", str(src), "nosuchhost.invalid:/tmp/x", env=env)
    assert p.returncode == 20 and "cannot connect to nosuchhost.invalid: ssh: Could not resolve hostname" in p.stderr, p.stderr
    p = push(server, src, tmp_path / "d", remote="no-such-deltavault")
    assert p.returncode == 17 and "install deltavault there or pass --remote-command" in p.stdout, p.stdout
    write(tmp_path / "a-file", b"in the way")
    p = push(server, src, tmp_path / "a-file/sub")
    assert p.returncode == 17 and "not a directory" in p.stdout, p.stdout
    p = dv("sync", f"dvtest:{src}", f"dvtest:{tmp_path / 'd'}", env=env)
    assert p.returncode == 2 and "cannot both be on other hosts" in p.stderr


def refusal(server: Server, tmp_path: Path, src: str, dst: str, config: Path | None = None) -> tuple[str, dict]:
    """``sync SRC DST`` that ssh cannot get through: the one line it says, then its --json error."""
    env = {"DELTAVAULT_SSH_CONFIG": str(config or server.ssh_config)}
    p = dv("sync", "--remote-command", REMOTE, src, dst, env=env)
    assert p.stderr.startswith("deltavault: ") and p.stderr.count("\n") == 1, p.stderr  # no traceback
    j = dv("--json", "sync", "--remote-command", REMOTE, src, dst, env=env)
    error = next(json.loads(x) for x in j.stdout.splitlines() if '"error"' in x)
    assert p.returncode == j.returncode == error["exit_code"], (p.stderr, error)
    assert not list(tmp_path.rglob("*.dv-sync-*")) and not (tmp_path / "dst").exists()
    return p.stderr, error


def test_ssh_that_cannot_log_in_or_connect_exits_19_or_20(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f", b"x")
    # nothing listens on the port: 20, worth retrying
    port = free_port()
    msg, e = refusal(server, tmp_path, str(src), f"ssh://dvtest:{port}{tmp_path}/dst")
    assert e["exit_code"] == 20 and e["retryable"], e
    assert f"cannot connect to dvtest: ssh: connect to host 127.0.0.1 port {port}: Connection refused" in msg
    # a user the server refuses (push), a key it refuses (pull): 19, not retried
    msg, e = refusal(server, tmp_path, str(src), f"nobody-here@dvtest:{tmp_path}/dst")
    assert e["exit_code"] == 19 and not e["retryable"], e
    assert "ssh login to nobody-here@dvtest refused: nobody-here@127.0.0.1: Permission denied (publickey)" in msg
    authorized = (server.dir / "authorized_keys").read_bytes()
    (server.dir / "authorized_keys").write_text("")
    msg, e = refusal(server, tmp_path, f"dvtest:{src}", str(tmp_path / "dst"))
    assert e["exit_code"] == 19 and not e["retryable"] and "Permission denied (publickey)" in msg, e
    (server.dir / "authorized_keys").write_bytes(authorized)
    # a host key other than known_hosts has, or none, with strict checking: 20, not retried
    strict = server.dir / "strict_config"
    strict.write_text(server.ssh_config.read_text() + "  StrictHostKeyChecking yes\n")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    (server.dir / "known_hosts").write_text(f"[127.0.0.1]:{server.port} {kind} {key}\n")
    msg, e = refusal(server, tmp_path, str(src), f"dvtest:{tmp_path}/dst", strict)
    assert e["exit_code"] == 20 and not e["retryable"], e
    assert "the host key of dvtest does not match known_hosts" in msg and "has changed" in msg
    (server.dir / "known_hosts").write_text("")
    msg, e = refusal(server, tmp_path, f"dvtest:{src}", str(tmp_path / "dst"), strict)
    assert e["exit_code"] == 20 and not e["retryable"] and "the host key of dvtest is not known" in msg, e


def test_the_far_end_cannot_pass_for_ssh(server: Server, tmp_path: Path) -> None:
    """A login refusal is read from ssh's own log (-E), not from the stream the other host's
    stderr comes on: a remote command printing ssh's words and exiting 255 is a failure of
    that host (15, retried), not a refused login (19)."""
    src = tmp_path / "src"
    write(src / "f", b"x")
    env = {"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}
    fake = "echo 'dvtest@127.0.0.1: Permission denied (publickey).' >&2; exit 255; :"
    logs = set(Path(tempfile.gettempdir()).glob("dv-ssh-*"))
    p = dv("--json", "sync", "--remote-command", fake, str(src), f"dvtest:{tmp_path}/dst", env=env)
    error = next(json.loads(x) for x in p.stdout.splitlines() if '"error"' in x)
    assert p.returncode == 15 and error["retryable"], (p.stdout, p.stderr)
    assert set(Path(tempfile.gettempdir()).glob("dv-ssh-*")) <= logs  # ssh's log removed


def test_ssh_with_no_common_algorithm_or_a_bad_config_exits_20_or_2(server: Server, tmp_path: Path) -> None:
    """ssh's other failures before the far end answers: no cipher both ends know (an old
    server, or a Ciphers line here) is not worth retrying (20); this host's ssh configuration
    unusable is the user's to fix (2). Both were exit 15, 'failed after retries'."""
    src = tmp_path / "src"
    write(src / "f", b"x")
    old = server.dir / "old_cipher_config"  # OpenSSH's sshd offers no CBC cipher by default
    old.write_text(server.ssh_config.read_text() + "  Ciphers aes128-cbc\n")
    msg, e = refusal(server, tmp_path, str(src), f"dvtest:{tmp_path}/dst", old)
    assert e["exit_code"] == 20 and not e["retryable"], e
    assert "ssh and dvtest have no algorithm in common: Unable to negotiate with 127.0.0.1 port" in msg, msg
    assert "no matching cipher found" in msg, msg
    bad = server.dir / "bad_config"
    bad.write_text(server.ssh_config.read_text() + "  NoSuchOption yes\n")
    msg, e = refusal(server, tmp_path, f"dvtest:{src}", str(tmp_path / "dst"), bad)
    assert e["exit_code"] == 2 and not e["retryable"], e
    assert f"ssh cannot run with this host's configuration: {bad}: line" in msg, msg
    assert "Bad configuration option: nosuchoption" in msg, msg
