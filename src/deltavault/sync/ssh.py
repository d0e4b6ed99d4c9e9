"""A sync end on another host, and the ssh process that carries the protocol there: to
``deltavault sync-agent`` (a push: DST is remote) or ``deltavault sync-source`` (a pull).

Locations: ``[user@]host:path`` (a colon before the first slash, as scp and rsync read
it; write ``./a:b`` for a local name with a colon) and ``ssh://[user@]host[:port]/path``
(``/~/path`` is relative to the remote home). The ssh client is OpenSSH's, so its
configuration, agent and known hosts apply; DELTAVAULT_SSH_CONFIG names another config
file, as for sftp repositories.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from deltavault.backends.ssh import host_key_changed
from deltavault.errors import (
    AccessRefused,
    BackendError,
    DeltavaultError,
    ExitCode,
    NoSpace,
    SourceError,
    TargetError,
    Unreachable,
    UsageError,
)
from deltavault.sync.wire import Channel

DEFAULT_REMOTE = "deltavault"  # the program ssh runs; the subcommand is added
_LOG = "ssh.log"  # ssh -E writes its own messages here, in a private temporary folder


@dataclass(frozen=True)
class RemotePath:
    host: str  # as ssh takes it: user@host or host
    path: str
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.port is None else f"ssh://{self.host}:{self.port}/{self.path}"


def parse_remote(spec: str) -> RemotePath | None:
    """The remote destination ``spec`` names, or None for a local path."""
    if spec.startswith("ssh://"):
        u = urlsplit(spec)
        try:
            port = u.port
        except ValueError:
            raise UsageError(f"bad port in {spec!r}") from None
        if not u.hostname or not u.path or u.path == "/":
            raise UsageError(f"{spec!r}: use ssh://[user@]host[:port]/path")
        host = f"{u.username}@{u.hostname}" if u.username else u.hostname
        path = (u.path[3:] or ".") if u.path.startswith("/~/") else u.path
        return RemotePath(host, path, port)
    head, colon, tail = spec.partition(":")
    if not colon or not head or "/" in head:
        return None
    if head.endswith("@") or head.startswith("@"):
        raise UsageError(f"{spec!r}: use [user@]host:path")
    return RemotePath(head, tail or ".")


def _ciphers(argv: list[str], host: str) -> str | None:
    try:
        out = subprocess.run([*argv, "-G", "--", host], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((ln for ln in out.splitlines() if ln.startswith("ciphers ")), None)


def _default_ciphers(argv: list[str], host: str) -> bool:
    """Is the cipher list for ``host`` OpenSSH's built-in one (nothing configured)?"""
    mine = _ciphers(argv, host)
    return mine is not None and mine == _ciphers([argv[0], "-F", "/dev/null"], host)


# OpenSSH's own messages (default LogLevel) for a connection that never got as far as running
# the command: a refused login, a host key not trusted, a host not reached.
# Whole lines only: the far end's own stderr comes on the same stream (a "Permission denied
# (os error 13)" of a remote tool is not a refused login).
_LOGIN_REFUSED = re.compile(r"^(\S+@\S+: )?Permission denied \([\w,-]+\)\.?$|^Received disconnect from \S+ port \d+:"
                            r"\d+: Too many authentication failures|^Too many authentication failures")
_KEY_CHANGED = re.compile(r"^Host key for .* has changed")
_KEY_UNKNOWN = re.compile(r"^No \S+ host key is known for ")
_NOT_REACHED = re.compile(r"^(ssh: Could not resolve hostname |ssh: connect to host |Connection timed out during "
                          r"banner exchange|Connection to \S+ port \d+ timed out|Connection (closed|reset) by "
                          r"\S+ port \d+|kex_exchange_identification: )")
# The two ends share no cipher, key exchange or host key type (an old server, or a Ciphers or
# KexAlgorithms line here): retrying cannot help.
_NO_ALGORITHM = re.compile(r"^Unable to negotiate with \S+ port \d+: no matching ")
# This host's ssh configuration (-F DELTAVAULT_SSH_CONFIG, ~/.ssh/config) is unusable.
_BAD_CONFIG = re.compile(r"^.+: line \d+: Bad configuration option: |^.+: terminating, \d+ bad configuration "
                         r"options?$|^Bad owner or permissions on ")


def _not_connected(host: str, err: str) -> DeltavaultError | None:
    """The typed error for ssh's exit 255 before the far end said anything, from ssh's own
    message, as the sftp backend types paramiko's (backends/ssh.py): a refused login
    (AccessRefused, exit 19), a host key not trusted or no algorithm both ends know
    (Unreachable, not retried), a host not reached (Unreachable, exit 20), this host's ssh
    configuration unusable (UsageError, exit 2); None for anything else."""
    lines = [ln.strip() for ln in err.splitlines()]
    bad = [ln for ln in lines if _BAD_CONFIG.match(ln)]
    if bad:
        return UsageError(f"ssh cannot run with this host's configuration: {bad[0]}")
    for ln in lines:
        if _KEY_CHANGED.match(ln):
            return host_key_changed(host, ln)
        if _KEY_UNKNOWN.match(ln):
            return Unreachable(f"the host key of {host} is not known: add it to known_hosts: {ln}", retryable=False)
    if "Host key verification failed." in lines:
        return Unreachable(f"the host key of {host} could not be verified: refusing to connect", retryable=False)
    for ln in lines:
        if _LOGIN_REFUSED.match(ln):
            return AccessRefused(f"ssh login to {host} refused: {ln}")
    for ln in lines:
        if _NOT_REACHED.match(ln):
            return Unreachable(f"cannot connect to {host}: {ln}")
        if _NO_ALGORITHM.match(ln):
            return Unreachable(f"ssh and {host} have no algorithm in common: {ln}", retryable=False)
    return None


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith(("flags", "Features")) and " aes" in line for line in f)
    except OSError:
        return False


class SshProcess:
    """``ssh HOST COMMAND`` with its stdin and stdout as a frame channel."""

    def __init__(self, where: RemotePath, command: str, *, rsh: str = "ssh") -> None:
        argv = shlex.split(rsh)
        config = os.environ.get("DELTAVAULT_SSH_CONFIG")
        if config:
            argv += ["-F", config]
        if where.port is not None:
            argv += ["-p", str(where.port)]
        if rsh == "ssh" and _default_ciphers(argv, where.host) and _cpu_has_aes():
            # OpenSSH offers ChaCha20 first; with AES instructions AES-GCM moves 40% more
            # through ssh here (the cipher bounds a push's speed). Only when no Ciphers is
            # configured for the host: an admin's choice stands.
            argv += ["-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
        # OpenSSH's own messages go to a log of their own (-E), apart from the far end's
        # stderr: what says a login was refused is then ssh's, never the other host's.
        self._logdir = tempfile.mkdtemp(prefix="dv-ssh-") if os.path.basename(argv[0]) == "ssh" else None
        if self._logdir is not None:
            argv += ["-E", os.path.join(self._logdir, _LOG)]
        argv += ["-T", "-o", "ServerAliveInterval=15", "--", where.host, command]
        self.where, self.command = where, command
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError as exc:
            self._remove_log()
            raise UsageError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.channel = Channel(self.proc.stdout, self.proc.stdin)
        self._err = bytearray()
        self._drain = threading.Thread(target=self._read_stderr, name="dv-ssh-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self._err) < 64 * 1024:
                self._err += line

    def stderr_text(self) -> str:
        self._drain.join(timeout=5)
        return self._err.decode("utf-8", "replace").strip()

    def ssh_log(self) -> str | None:
        """ssh's own messages (its -E log; None when the command is not OpenSSH's ssh)."""
        if self._logdir is None:
            return None
        try:
            with open(os.path.join(self._logdir, _LOG), "rb") as f:
                return f.read(64 * 1024).decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _remove_log(self) -> None:
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None

    def failure(self, what: str) -> Exception:
        """The error for a connection that ended early: ssh's own failure, a missing agent,
        or an agent that died."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        err = self.stderr_text()
        last = err.splitlines()[-1] if err else ""
        own = self.ssh_log()
        own = err if own is None else own  # not OpenSSH's ssh: its messages are on stderr
        refused = _not_connected(self.where.host, own) if rc == 255 and not self.channel.received else None
        if refused is not None:
            return refused
        if rc == 255:
            said = own.splitlines()[-1] if own else last
            return BackendError(f"ssh to {self.where.host} failed: {said or 'exit 255'}", retryable=True)
        if rc == 127:
            return TargetError(f"{self.where.host} has no {self.command.split()[0]!r} to run: install deltavault "
                               f"there or pass --remote-command ({last})")
        known = {int(ExitCode.USAGE): UsageError, int(ExitCode.NO_SPACE): NoSpace,
                 int(ExitCode.SOURCE): SourceError, int(ExitCode.TARGET): TargetError}
        if rc in known and last.startswith("deltavault: "):  # the far end's own clear error
            return known[rc](f"{self.where.host}: {last[len('deltavault: '):]}")
        return BackendError(f"deltavault on {self.where.host} {what} (exit {rc}): {last or 'no message'}",
                            retryable=True)

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        self._remove_log()
