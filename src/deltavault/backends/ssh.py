"""SSH connections for the sftp backend: where to connect (``sftp://`` and scp-style
locations), how (the OpenSSH client configuration: host names, users, ports, identity
files, known-hosts files, ProxyJump, ProxyCommand), and the connection itself. Unknown
host keys are refused: there is no trust on first use for a backup target.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavault.errors import AccessRefused, BackendError, Unreachable, UsageError

if TYPE_CHECKING:
    import paramiko


@dataclass(frozen=True)
class SFTPLocation:
    host: str
    path: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        path = self.path if self.path.startswith("/") else "/~/" + self.path
        return f"sftp://{user}{self.host}{port}{path}"


def parse_location(url: str) -> SFTPLocation:
    """``sftp://[user@]host[:port]/path`` (``/~/x`` is x under the home folder) or
    ``sftp:[user@]host:path``."""
    if url.startswith("sftp://"):
        rest = url[len("sftp://"):]
        netloc, slash, path = rest.partition("/")
        if not slash or not path.strip("/"):
            raise UsageError(f"{url!r}: give the repository folder, e.g. sftp://host/srv/backup")
        path = path[2:] if path.startswith("~/") else "/" + path
        user, _, hostport = netloc.rpartition("@")
        host, port = hostport, None
        if hostport.startswith("["):  # [v6 address]:port
            host, _, tail = hostport[1:].partition("]")
            port = tail[1:] or None if tail.startswith(":") else None
        elif hostport.count(":") == 1:
            host, port = hostport.split(":")
        if port is not None and not port.isdigit():
            raise UsageError(f"{url!r}: the port must be a number")
        loc = SFTPLocation(host, path.rstrip("/") or "/", user or None, int(port) if port else None)
    elif url.startswith("sftp:"):
        rest = url[len("sftp:"):]
        hostpart, colon, path = rest.partition(":")
        if not colon or not path:
            raise UsageError(f"{url!r}: use sftp:[user@]host:path or sftp://[user@]host[:port]/path")
        user, _, host = hostpart.rpartition("@")
        loc = SFTPLocation(host, path.rstrip("/") or "/", user or None, None)
    else:
        raise UsageError(f"{url!r} is not an sftp location")
    if not loc.host:
        raise UsageError(f"{url!r}: no host name")
    return loc


def host_key_changed(where: str, said: str = "") -> Unreachable:
    """A host key other than known_hosts has: never connected, nor retried (sftp
    repositories, and sync over OpenSSH's ssh, whose own message is ``said``)."""
    return Unreachable(f"the host key of {where} does not match known_hosts: refusing to connect (if the host "
                       "was reinstalled, update known_hosts)" + (f": {said}" if said else ""), retryable=False)


def paramiko_module() -> Any:
    """paramiko, imported without invoke: paramiko imports it eagerly, only to run the
    command of a ``Match exec`` in an ssh config, and it cost 7.4 MiB of every sftp run's
    memory (yaml, unittest, asyncio; issue #18). ``_enable_match_exec`` brings it back for
    a config that has one."""
    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail
        try:
            return _import_paramiko()
        finally:
            if sys.modules.get("invoke", 0) is None:
                del sys.modules["invoke"]
    return _import_paramiko()


def _import_paramiko() -> Any:
    try:
        import paramiko
    except ImportError as exc:
        raise UsageError("the sftp backend needs paramiko: pip install 'deltavault[sftp]'") from exc
    return paramiko


_MATCH_EXEC = re.compile(rb"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


def _enable_match_exec(pm: Any, config_file: str) -> None:
    """Give paramiko's config module invoke, if the config runs ``Match exec`` commands."""
    if getattr(pm.config, "invoke", None) is not None:
        return
    try:
        with open(config_file, "rb") as f:
            if not _MATCH_EXEC.search(f.read()):
                return
    except OSError:
        return  # the reader below reports it
    try:
        import invoke
    except ImportError as exc:
        raise UsageError(f"{config_file} has a 'Match exec' line, which needs invoke: pip install invoke") from exc
    pm.config.invoke, pm.config.invoke_import_error = invoke, None


def _gcm_first(*args: Any, **kw: Any) -> paramiko.Transport:
    """A transport that offers AES-GCM first (one pass for cipher and MAC, on both ends);
    paramiko's default order starts with AES-CTR and a separate HMAC."""
    t = paramiko_module().Transport(*args, **kw)
    gcm = tuple(c for c in t._preferred_ciphers if c.endswith("-gcm@openssh.com"))
    t._preferred_ciphers = gcm + tuple(c for c in t._preferred_ciphers if c not in gcm)
    return t


@dataclass
class SshTarget:
    loc: SFTPLocation
    config_file: str  # the OpenSSH client configuration to honour
    timeout: float = 30.0

    def settings(self) -> dict[str, Any]:
        pm = paramiko_module()
        host_cfg: dict[str, Any] = {}
        have_config = os.path.exists(self.config_file)
        if have_config:
            _enable_match_exec(pm, self.config_file)
            try:
                host_cfg = dict(pm.SSHConfig.from_path(self.config_file).lookup(self.loc.host))
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read the ssh configuration {self.config_file}: {exc}") from exc
        port = self.loc.port or int(host_cfg.get("port", 22))
        hostname = host_cfg.get("hostname", self.loc.host)
        proxy = host_cfg.get("proxycommand")
        if proxy is not None and proxy.lower() == "none":
            proxy = None
        jump = host_cfg.get("proxyjump", "none")
        if proxy is None and jump.lower() != "none":
            # ssh makes the hops, with its own config, agent and known hosts for them
            *via, last = jump.split(",")
            argv = ["ssh", "-o", "BatchMode=yes"]
            if have_config:
                argv += ["-F", self.config_file]
            if via:
                argv += ["-J", ",".join(via)]
            proxy = shlex.join([*argv, "-W", f"{hostname}:{port}", last])
        return {
            "proxy": proxy,
            "hostname": hostname,
            "port": port,
            "username": self.loc.user or host_cfg.get("user") or None,
            "key_filename": [os.path.expanduser(p) for p in host_cfg.get("identityfile", [])] or None,
            "known_hosts": [os.path.expanduser(p) for p in str(host_cfg.get("userknownhostsfile", "")).split()],
            "timeout": float(host_cfg.get("connecttimeout", self.timeout)),
        }

    def connect(self) -> paramiko.SSHClient:
        pm = paramiko_module()
        s = self.settings()
        client = pm.SSHClient()
        client.set_missing_host_key_policy(pm.RejectPolicy())
        try:
            client.load_system_host_keys()
            for path in s["known_hosts"]:
                if os.path.exists(path):
                    client.get_host_keys().load(path)
        except (OSError, pm.SSHException) as exc:
            raise BackendError(f"cannot read known hosts: {exc}", retryable=False) from exc
        where = f"{s['hostname']}:{s['port']}"
        try:
            sock = pm.ProxyCommand(s["proxy"]) if s["proxy"] else None
            client.connect(s["hostname"], port=s["port"], username=s["username"],
                           key_filename=s["key_filename"], timeout=s["timeout"],
                           banner_timeout=s["timeout"], auth_timeout=s["timeout"],
                           transport_factory=_gcm_first, sock=sock)
        except pm.BadHostKeyException as exc:
            raise host_key_changed(where) from exc
        except pm.AuthenticationException as exc:
            raise AccessRefused(f"ssh login to {where} as {s['username'] or 'the current user'} failed: "
                                f"{exc}") from exc
        except pm.IncompatiblePeer as exc:  # no cipher, key exchange or key type both know
            raise Unreachable(f"the ssh client and {where} have no algorithm in common: {exc}",
                              retryable=False) from exc
        except pm.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise Unreachable(f"the host key of {where} is not known: add it to ~/.ssh/known_hosts "
                                  f"(ssh-keyscan -p {s['port']} {s['hostname']})", retryable=False) from exc
            raise BackendError(f"ssh connection to {where} failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            # paramiko gathers the per-address socket errors of a failed connect in .errors
            causes = {getattr(e, "strerror", None) or str(e) for e in getattr(exc, "errors", {}).values()}
            why = ", ".join(sorted(causes)) or getattr(exc, "strerror", None) or str(exc)
            raise Unreachable(f"cannot connect to {where}: {why}") from exc
        transport = client.get_transport()
        sock = getattr(transport, "sock", None)
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without it, Nagle holds back the tail of each request: a 100 KB ranged get took
            # 13 ms on loopback instead of 0.6 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client
