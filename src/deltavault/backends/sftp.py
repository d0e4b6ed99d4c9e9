"""SFTP backend: a repository in a directory of any host that speaks SFTP over SSH.

Locations: ``sftp://[user@]host[:port]/abs/path`` or scp style ``sftp:[user@]host:path``
(a relative path is under the login's home). Host names, users, ports, identity files,
known-hosts files, ProxyJump and ProxyCommand come from the OpenSSH client configuration
(``~/.ssh/config``, or the file named by DELTAVAULT_SSH_CONFIG), as an admin expects
(ssh.py makes the connection).

Atomic put: write a temporary name in the target folder, ``fsync@openssh.com`` when the server
offers it, then ``posix-rename@openssh.com`` over the final name. Every WRITE's reply is
checked before the rename. SFTP v3 reports a full disk as a bare "Failure", so a failed
write asks ``statvfs@openssh.com`` whether the file system is full before it says so.
``put_file`` sends a spooled pack from its file a piece at a time, never whole in memory.

Each thread gets its own SFTP channel on one SSH connection (paramiko's SFTP client is not
meant to be shared between threads). A dropped connection is a retryable error; the next call
connects again.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat as statmod
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from deltavault.backends.base import TEMP_PREFIX, ObjectInfo, check_object_name, temp_name
from deltavault.backends.limits import check_size, too_large, whole_limit
from deltavault.backends.sftpio import FilePieces, pread, pwrite
from deltavault.backends.ssh import SFTPLocation, SshTarget, paramiko_module
from deltavault.errors import AccessRefused, BackendError, NoSpace, ObjectNotFound

if TYPE_CHECKING:
    import paramiko

_OPEN_PACKS = 16  # pack handles kept open per thread
_ONE_REQUEST = 32 * 1024  # a READ or WRITE size every server accepts
_LARGEST_REQUEST = 256 * 1024  # what we ask for where the server says it takes more (limits@openssh.com)
_WINDOW = 2 * 1024 * 1024  # paramiko's default, as OpenSSH's
_MAX_PACKET = 32 * 1024  # paramiko's default
T = TypeVar("T")


class SFTPBackend:
    def __init__(self, loc: SFTPLocation, *, config_file: str | None = None,
                 timeout: float = 30.0, read_timeout: float = 120.0) -> None:
        self.loc = loc
        # The longest wait for one reply (a server fsyncing a pack to a slow disk is slow, a
        # server that took a request and never answers it is gone): then the connection is lost.
        self.read_timeout = read_timeout
        self.ssh = SshTarget(loc, config_file or os.environ.get("DELTAVAULT_SSH_CONFIG")
                             or os.path.expanduser("~/.ssh/config"), timeout)
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._generation = 0
        self._local = threading.local()
        self._root: str | None = None
        self._made_dirs: set[str] = set()
        self._fsync_ok = True
        self._sizes: tuple[int, int] | None = None  # READ and WRITE request sizes of this connection

    # --- connection -------------------------------------------------------------------

    def location(self) -> str:
        return str(self.loc)

    def _sftp(self) -> paramiko.SFTPClient:
        """This thread's SFTP channel, on a live connection (made on first use)."""
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if client is None or transport is None or not transport.is_active():
                if client is not None:
                    client.close()
                self._client = client = self.ssh.connect()
                self._generation += 1
                self._made_dirs.clear()
                self._sizes = None
            generation = self._generation
        cached = getattr(self._local, "sftp", None)
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            sftp = paramiko_module().SFTPClient.from_transport(client.get_transport(), window_size=_WINDOW,
                                                               max_packet_size=_MAX_PACKET)
            # Every wait for a reply ends: a server that stops answering (a READ taken and
            # never answered) held the call for ever. A timeout is a lost connection (_call).
            sftp.get_channel().settimeout(self.read_timeout)
        except Exception as exc:
            raise BackendError(f"cannot open an sftp channel on {self.loc.host}: {exc}") from exc
        self._local.sftp = (generation, sftp)
        return sftp

    def _request_sizes(self, s: paramiko.SFTPClient) -> tuple[int, int]:
        """READ and WRITE sizes: up to _LARGEST_REQUEST where the server's limits@openssh.com
        allows it (OpenSSH 8.6 and later: 255 KiB), else _ONE_REQUEST. Fewer, larger replies
        cost less here: paramiko moves a channel's whole unread buffer on every read from it,
        so its cost grows with the replies per byte (a restore spent most of its SFTP time
        there, docs/benchmarks.md)."""
        sizes = self._sizes
        if sizes is None:
            pm = paramiko_module()
            try:
                _t, msg = s._request(pm.sftp.CMD_EXTENDED, "limits@openssh.com")
                _packet, read, write = msg.get_int64(), msg.get_int64(), msg.get_int64()
            except (OSError, pm.SFTPError):
                read = write = 0  # not offered
            def fit(limit: int) -> int:
                return min(limit, _LARGEST_REQUEST) if limit > _ONE_REQUEST else _ONE_REQUEST
            sizes = self._sizes = (fit(read), fit(write))
        return sizes

    def close(self, generation: int | None = None) -> None:
        """Close the connection; the next call connects again. ``generation``: only if it
        is still that one: a thread whose channel died with an older connection closed the
        one another thread had just made, failing that thread's calls in turn."""
        with self._lock:
            if self._client is not None and generation in (None, self._generation):
                self._client.close()
                self._client = None

    def _call(self, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run ``fn`` on this thread's channel and turn failures into backend errors."""
        pm = paramiko_module()
        sftp = self._sftp()
        generation = self._local.sftp[0]  # of the connection this channel is on
        try:
            return fn(sftp)
        except BackendError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise ObjectNotFound(f"{what}: not found") from exc
            if exc.errno == errno.EACCES:
                raise AccessRefused(f"{what}: permission denied on {self.loc.host}") from exc
            if exc.errno is None and not isinstance(exc, TimeoutError) and not _closed(sftp):
                # paramiko's form of the server's own status ("Failure"): not a network
                # fault, so not retried. (Its "Socket is closed", for a call in flight on
                # one thread when another closed the dead connection, is one.)
                raise BackendError(f"{what}: the sftp server on {self.loc.host} said: {exc}",
                                   retryable=False) from exc
            self.close(generation)  # a socket error: the next attempt connects again
            raise BackendError(f"{what}: connection to {self.loc.host} lost: {exc}") from exc
        except (EOFError, pm.SSHException, pm.SFTPError) as exc:
            self.close(generation)
            raise BackendError(f"{what}: connection to {self.loc.host} lost: {exc or type(exc).__name__}") from exc

    # --- names --------------------------------------------------------------------------

    def _base(self) -> str:
        if self._root is None:
            path = self.loc.path
            if not path.startswith("/"):
                home = self._call("home folder", lambda s: s.normalize("."))
                path = posixpath.join(home, path)
            self._root = path
        return self._root

    def _path(self, name: str) -> str:
        check_object_name(name)
        return posixpath.join(self._base(), name) if name else self._base()

    # --- the Backend protocol --------------------------------------------------------------

    def exists(self) -> bool:
        path = self._path("")
        try:
            st = self._call(path, lambda s: s.stat(path))
        except ObjectNotFound:
            return False
        return statmod.S_ISDIR(st.st_mode or 0)

    def _walk(self, top: str) -> Iterator[tuple[str, Any]]:
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                entries = self._call(d, lambda s, d=d: s.listdir_attr(d))  # type: ignore[misc]
            except ObjectNotFound:
                continue
            for e in entries:
                if not e.filename or e.filename in (".", "..") or "/" in e.filename or "\0" in e.filename:
                    continue  # a lying server's: it would lead the walk out of the repository
                full = posixpath.join(d, e.filename)
                if statmod.S_ISDIR(e.st_mode or 0):
                    stack.append(full)
                else:
                    yield full, e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._base()
        top = self._path(prefix.rstrip("/")) if prefix else base
        for full, attr in self._walk(top):
            if posixpath.basename(full).startswith(TEMP_PREFIX):
                continue
            yield ObjectInfo(posixpath.relpath(full, base), attr.st_size or 0)

    def _pack_handle(self, s: paramiko.SFTPClient, path: str) -> paramiko.SFTPFile:
        """An open handle on an immutable object (a pack), kept per thread: a restore reads
        many ranges of each pack, and an open and a close would cost two round trips each."""
        cached = getattr(self._local, "handles", None)
        if cached is None or cached[0] is not s:
            cached = self._local.handles = (s, OrderedDict())
        handles: OrderedDict[str, paramiko.SFTPFile] = cached[1]
        f = handles.get(path)
        if f is not None:
            handles.move_to_end(path)
            return f
        f = s.open(path, "rb")
        handles[path] = f
        if len(handles) > _OPEN_PACKS:
            _old, stale = handles.popitem(last=False)
            try:
                stale.close()
            except Exception:
                pass
        return f

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)

        def read_from(f: paramiko.SFTPFile) -> bytes:
            start, n, most = offset, length or 0, None
            if offset < 0 or length is None:
                said = f.stat().st_size
                size = said or 0
                if offset < 0:
                    if size < -offset:
                        raise ObjectNotFound(f"{name}: shorter than {-offset} bytes")
                    start = size + offset
                    n = -offset if length is None else length
                else:  # whole, or from offset to the end: bounded by its kind
                    most = whole_limit(name)
                    check_size(name, size - start, most)
                    n = size - start if said is not None else most + 1  # no size said: to the end
            data = pread(f.sftp, f.handle, start, n, self._request_sizes(f.sftp)[0]) if n > 0 else b""
            if most is not None and len(data) > most:
                raise too_large(name, None, most)
            return data

        def read(s: paramiko.SFTPClient) -> bytes:
            if name.startswith("data/") and length is not None and offset >= 0:
                return read_from(self._pack_handle(s, path))
            with s.open(path, "rb") as f:
                return read_from(f)
        return self._call(name, read)

    def _mkdirs(self, s: paramiko.SFTPClient, folder: str) -> None:
        if folder in self._made_dirs:
            return
        todo = []
        d = folder
        while d not in ("", "/"):
            try:
                if statmod.S_ISDIR(s.stat(d).st_mode or 0):
                    break
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            todo.append(d)
            d = posixpath.dirname(d)
        for d in reversed(todo):
            try:
                s.mkdir(d, 0o700)
            except OSError:
                # Another writer made it meanwhile: fine. Else the mkdir's own error: a
                # permission denied was reported as the stat's "not found" (exit 15).
                if not _is_dir(s, d):
                    raise
        self._made_dirs.add(folder)

    def put(self, name: str, data: bytes) -> None:
        view = memoryview(data)
        self._store(name, len(data), lambda pos, n: view[pos:pos + n])

    def put_file(self, name: str, fd: int, size: int) -> None:
        """``put`` of the first ``size`` bytes of the file open as ``fd`` (a spooled pack),
        read a piece at a time: memory stays at one piece (sftpio._PIECE) plus the requests in flight."""
        self._store(name, size, FilePieces(fd, size))

    def _store(self, name: str, size: int, piece: Callable[[int, int], bytes | memoryview]) -> None:
        path = self._path(name)
        folder = posixpath.dirname(path)
        tmp = posixpath.join(folder, temp_name(posixpath.basename(path)))

        def write(s: paramiko.SFTPClient) -> None:
            self._mkdirs(s, folder)
            try:
                with s.open(tmp, "wb") as f:
                    pwrite(s, f.handle, size, piece, self._request_sizes(s)[1])
                    self._fsync(s, f.handle)
                s.posix_rename(tmp, path)
            except BaseException as exc:
                self._remove_quietly(s, tmp)
                if isinstance(exc, OSError) and exc.errno is None and self._disk_full(s, folder, size):
                    raise NoSpace(f"no space left on {self.loc.host}:{folder} while writing {name}") from exc
                raise
        self._call(name, write)

    def _fsync(self, s: paramiko.SFTPClient, handle: bytes) -> None:
        """Durable before the rename, where the server can do it (OpenSSH can)."""
        if not self._fsync_ok:
            return
        pm = paramiko_module()
        try:
            s._request(pm.sftp.CMD_EXTENDED, "fsync@openssh.com", handle)
        except OSError as exc:
            if exc.errno is not None or "unsupported" not in str(exc).lower():
                raise
            self._fsync_ok = False  # not offered: the rename still keeps the put atomic

    def _disk_full(self, s: paramiko.SFTPClient, folder: str, need: int) -> bool:
        pm = paramiko_module()
        try:
            _t, msg = s._request(pm.sftp.CMD_EXTENDED, "statvfs@openssh.com", folder)
            bsize, frsize, _blocks, _bfree, bavail = (msg.get_int64() for _ in range(5))
        except Exception:
            return False
        return bool(bavail * (frsize or bsize) < need + 64 * 1024)

    @staticmethod
    def _remove_quietly(s: paramiko.SFTPClient, path: str) -> None:
        try:
            s.remove(path)
        except Exception:
            pass

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self._call(name, lambda s: s.remove(path))
        except ObjectNotFound:
            return

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        st = self._call(name, lambda s: s.stat(path))
        return ObjectInfo(name, st.st_size or 0)

    def remove_temp_files(self, older_than: float, *, dry_run: bool = False) -> tuple[int, int]:
        """As LocalBackend.remove_temp_files: temp files of puts that never finished. Ages
        come from the server's clock, compared with ours (minutes of skew are harmless at an
        age of an hour)."""
        cutoff = time.time() - older_than
        files = size = 0
        for full, attr in self._walk(self._base()):
            if not posixpath.basename(full).startswith(TEMP_PREFIX) or (attr.st_mtime or 0) >= cutoff:
                continue
            if not dry_run:
                try:
                    self._call(full, lambda s, p=full: s.remove(p))  # type: ignore[misc]
                except ObjectNotFound:
                    continue
            files += 1
            size += attr.st_size or 0
        return files, size


def _is_dir(s: paramiko.SFTPClient, path: str) -> bool:
    try:
        return statmod.S_ISDIR(s.stat(path).st_mode or 0)
    except OSError:
        return False


def _closed(sftp: paramiko.SFTPClient) -> bool:
    """Whether the channel ``sftp`` works on, or its connection, is closed."""
    ch = sftp.get_channel()
    transport = ch.get_transport() if ch is not None else None
    return ch is None or ch.closed or transport is None or not transport.is_active()
