"""A real OpenSSH server on 127.0.0.1 for the sftp backend's tests, with its own host key,
client key and client configuration (nothing in ~/.ssh is read or changed)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_port
from tests.waits import until

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


def missing_tools() -> str | None:
    need = {"sshd": SSHD, "ssh-keygen": shutil.which("ssh-keygen"), "ssh": shutil.which("ssh")}
    missing = [name for name, path in need.items() if path is None]
    if missing:
        return f"needs {', '.join(missing)} (openssh-server; scripts/install-system-deps.sh installs it)"
    return None


@dataclass
class Server:
    dir: Path
    port: int
    user: str
    ssh_config: Path  # client config naming the host "dvtest"
    proc: subprocess.Popen[bytes]

    def url(self, path: str | Path) -> str:
        return f"sftp://dvtest{path}"

    def kill_sessions(self) -> None:
        """End every client connection (the per-connection sshd processes), keeping the listener."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


@contextmanager
def sshd(tmp: Path, extra: str = "") -> Iterator[Server]:
    """``extra``: more lines of sshd_config."""
    d = tmp / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_bytes((d / "client_key.pub").read_bytes())
    host_pub = (d / "host_key.pub").read_text().split()
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel ERROR
{extra}""")
    user = getpass.getuser()
    config = d / "ssh_config"
    config.write_text(f"""\
Host dvtest
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {d}/client_key
  UserKnownHostsFile {d}/known_hosts
""")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation folder, when run as root
    assert SSHD is not None
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        try:
            until(lambda: _listening(port), "sshd", proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {(d / 'sshd.log').read_text()}") from None
        yield Server(d, port, user, config, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
