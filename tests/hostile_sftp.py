"""A hostile SFTP server for the sftp backend's tests: paramiko's server side, serving a
local folder, that lies on demand where a real sshd cannot be made to (tests/sshd.py is
the honest one). ``Lies`` says how: READ replies longer than asked, READs never answered,
made-up folder entries (names that climb out, folders without end), and files of
gigabytes (with their size, or none said)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko


@dataclass
class Lies:
    extra_read: int = 0  # bytes added to every READ reply
    stall_reads: bool = False  # READs are never answered
    entries: list[tuple[str, int]] = field(default_factory=list)  # (name, st_mode) added to every listing
    huge: tuple[str, ...] = ()  # files in these folders are HUGE bytes of zeros (stat and READ)
    huge_unsized: bool = False  # ... and their stat says no size at all


HUGE = 2 << 30


def _huge(lies: Lies, path: str) -> bool:
    return os.path.basename(os.path.dirname(path)) in lies.huge


def _sized(lies: Lies, path: str, a: paramiko.SFTPAttributes) -> paramiko.SFTPAttributes:
    if _huge(lies, path):
        a.st_size = None if lies.huge_unsized else HUGE
    return a


@dataclass
class HostileServer:
    root: Path
    port: int
    ssh_config: Path  # client config naming the host "hostile"
    lies: Lies
    stop: threading.Event

    def url(self, path: str) -> str:
        return f"sftp://hostile{path}"


class _Handle(paramiko.SFTPHandle):
    def __init__(self, f: Any, path: str, lies: Lies, stop: threading.Event) -> None:
        super().__init__()
        self.readfile = self.writefile = f
        self.path, self.lies, self.stop = path, lies, stop

    def stat(self) -> paramiko.SFTPAttributes:
        return _sized(self.lies, self.path, paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno())))

    def read(self, offset: int, length: int) -> bytes | int:
        if self.lies.stall_reads:
            self.stop.wait()
            return paramiko.SFTP_FAILURE
        if _huge(self.lies, self.path):
            return b"\0" * max(0, min(length, HUGE - offset))
        data = super().read(offset, length)
        return data + b"\0" * self.lies.extra_read if isinstance(data, bytes) and data else data


def _attr(path: str, name: str | None = None) -> paramiko.SFTPAttributes:
    a = paramiko.SFTPAttributes.from_stat(os.lstat(path))
    if name is not None:
        a.filename = name
    return a


class _Sftp(paramiko.SFTPServerInterface):
    def __init__(self, server: Any, lies: Lies, stop: threading.Event) -> None:
        super().__init__(server)
        self.lies, self.stop = lies, stop

    def canonicalize(self, path: str) -> str:
        return os.path.normpath(path if path.startswith("/") else "/" + path)

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            out = [_attr(os.path.join(path, n), n) for n in os.listdir(path)]
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        for name, mode in self.lies.entries:
            a = paramiko.SFTPAttributes()
            a.filename, a.st_mode, a.st_size = name, mode, 5
            out.append(a)
        return out

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return _sized(self.lies, path, paramiko.SFTPAttributes.from_stat(os.stat(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    lstat = stat

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> _Handle | int:
        try:
            return _Handle(open(path, "rb"), path, self.lies, self.stop)  # the handle closes it
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)


class _Auth(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


@contextmanager
def hostile_sftp(tmp: Path) -> Iterator[HostileServer]:
    d = tmp / "hostile-sftp"
    (d / "root").mkdir(parents=True)
    host_key = paramiko.RSAKey.generate(2048)
    client_key = paramiko.RSAKey.generate(2048)
    client_key.write_private_key_file(str(d / "client_key"))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = int(lsock.getsockname()[1])
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} ssh-rsa {host_key.get_base64()}\n")
    (d / "ssh_config").write_text(f"Host hostile\n  HostName 127.0.0.1\n  Port {port}\n  User dv\n"
                                  f"  IdentityFile {d}/client_key\n  UserKnownHostsFile {d}/known_hosts\n")
    server = HostileServer(d / "root", port, d / "ssh_config", Lies(), threading.Event())
    transports: list[paramiko.Transport] = []

    def accept() -> None:
        while not server.stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            t.set_subsystem_handler("sftp", paramiko.SFTPServer, _Sftp, server.lies, server.stop)
            transports.append(t)
            t.start_server(server=_Auth())

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        # close() alone does not wake a thread blocked in accept() on Linux (the teardown
        # waited out the join's 10 s every time); shutdown() does.
        with contextlib.suppress(OSError):
            lsock.shutdown(socket.SHUT_RDWR)
        lsock.close()
        for t in transports:
            t.close()
        thread.join(timeout=10)


def is_dir(mode: int = 0o755) -> int:
    return stat.S_IFDIR | mode
