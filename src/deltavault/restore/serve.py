"""Instant recovery: a volume snapshot exported over NBD, so a VM can boot from the backup
while the real restore runs, and writes land in a local copy-on-write overlay.

The image is served by a FUSE mount of this process on a private directory
(restore/mount), and ``qemu-nbd`` exports it: read-only as raw, or, with an overlay, as a
qcow2 file whose backing file is the image. qemu keeps every written cluster in the
overlay, so the repository is never written, and the overlay is an ordinary qcow2 that
qemu, ``qemu-img commit`` or ``qemu-img convert`` can use later. Its backing file name
records the snapshot (``deltavault-volume-<id>``), so an overlay is reused only with the
snapshot it was made for; the real path is given at run time.

qemu-nbd runs as our child and dies with us (tracking/volume/qemuproc.py: SIGTERM here, so
it closes a written overlay cleanly); on every exit path it is stopped before the FUSE
mount goes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from deltavault.errors import SourceError, TargetError, Unavailable, UsageError
from deltavault.model.snapshot import Snapshot
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id
from deltavault.restore.mount.blobs import DEFAULT_CACHE, MountBlobs
from deltavault.restore.mount.namespace import Namespace
from deltavault.restore.mount.session import BackgroundMount
from deltavault.tracking.volume import qemuproc
from deltavault.tracking.volume.qemuproc import INSPECT_TIMEOUT

DEFAULT_LISTEN = "127.0.0.1:10809"
READY_WAIT = 30.0
CLIENTS = 16  # connections qemu-nbd accepts at once


@dataclass
class ServeOptions:
    listen: str | None = None  # host:port
    socket: str | None = None  # a Unix socket path instead
    overlay: str | None = None  # qcow2 copy-on-write overlay: writes go there
    cache_bytes: int = DEFAULT_CACHE


@dataclass
class ServeResult:
    address: str = ""
    bytes_read: int = 0
    seconds: float = 0.0


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_free(opts: ServeOptions) -> str:
    """The NBD URI clients use; refused when the address is taken."""
    if opts.socket:
        path = os.path.abspath(opts.socket)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"nbd+unix:///?socket={path}"
        if not stat.S_ISSOCK(st.st_mode):
            raise TargetError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(path) == 0:
                raise TargetError(f"the export socket {path} is in use by another server")
        os.unlink(path)  # a socket nobody listens on: left by a server that died
        return f"nbd+unix:///?socket={path}"
    host, port = parse_listen(opts.listen or DEFAULT_LISTEN)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TargetError(f"the export address {host}:{port} is in use or not available here "
                              f"({exc.strerror}); choose another with --listen HOST:PORT") from None
    return f"nbd://{host}:{port}" if family == socket.AF_INET else f"nbd://[{host}]:{port}"


def _overlay(path: str, sid: str, size: int) -> None:
    """Create the overlay, or check that an existing one was made for this snapshot."""
    mark = f"deltavault-volume-{sid}"
    if os.path.exists(path):
        p = qemuproc.run(["qemu-img", "info", "--output=json", path], f"qemu-img info {path}", TargetError,
                         timeout=INSPECT_TIMEOUT)
        if p.returncode != 0 and qemuproc.in_use(p.stderr):  # not to be called another's overlay
            raise TargetError(f"cannot open the overlay {path}: {qemuproc.explained(p.stderr)}")
        info = json.loads(p.stdout) if p.returncode == 0 else {}
        if info.get("format") != "qcow2" or info.get("backing-filename") != mark:
            raise UsageError(f"the overlay {path} was not made for volume snapshot {short_id(sid)} "
                             "(a deltavault qcow2 overlay names its snapshot); use another file")
        return
    p = qemuproc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", mark, "-F", "raw", path, str(size)],
                     f"creating the overlay {path}", TargetError, timeout=INSPECT_TIMEOUT)
    if p.returncode != 0:
        raise TargetError(f"cannot create the overlay {path}: {p.stderr.strip()}")


def _escape(path: str) -> str:
    return path.replace(",", ",,")  # qemu's option syntax doubles a comma


def _reachable(opts: ServeOptions) -> bool:
    if opts.socket:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(os.path.abspath(opts.socket)) == 0
    host, port = parse_listen(opts.listen or DEFAULT_LISTEN)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        return s.connect_ex((host, port)) == 0


def serve_volume(repo: Repository, sid: str, snap: Snapshot, opts: ServeOptions,
                 on_ready: Callable[[str], None], reporter: Reporter | None = None) -> ServeResult:
    """Export until interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM through the CLI)."""
    for tool in ("qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            raise Unavailable(f"serve needs {tool} (qemu-utils; scripts/install-system-deps.sh)")
    if opts.overlay:
        opts.overlay = os.path.abspath(opts.overlay)
    uri = check_free(opts)
    t0 = time.monotonic()
    before = repo.traffic.bytes_read
    blobs = MountBlobs(repo, opts.cache_bytes)
    child: subprocess.Popen[bytes] | None = None
    try:
        ns = Namespace(repo, blobs, snapshot=sid, refresh=float("inf"), reporter=reporter or NullReporter())
        view, _parts = ns.volume(sid, snap)
        if opts.overlay:
            _overlay(opts.overlay, sid, view.size)
        with BackgroundMount(ns) as images:
            image = os.path.join(images, "disk.img")
            if opts.overlay:
                spec = (f"driver=qcow2,file.driver=file,file.filename={_escape(opts.overlay)},"
                        f"backing.driver=raw,backing.file.driver=file,backing.file.filename={_escape(image)}")
                argv = ["qemu-nbd", "--image-opts", spec, "--discard=unmap"]
            else:
                argv = ["qemu-nbd", "--read-only", "--format=raw", image]
            where = (["--socket", os.path.abspath(opts.socket)] if opts.socket else
                     ["--bind", parse_listen(opts.listen or DEFAULT_LISTEN)[0],
                      "--port", str(parse_listen(opts.listen or DEFAULT_LISTEN)[1])])
            log = _log_file()
            child = qemuproc.spawn([*argv, *where, "--persistent", f"--shared={CLIENTS}"], stderr=log,
                                   death_signal=signal.SIGTERM)
            deadline = time.monotonic() + READY_WAIT
            while not _reachable(opts):
                if child.poll() is not None or time.monotonic() > deadline:
                    _stop(child)
                    err = _tail(log)
                    if "in use" in err:
                        raise TargetError(f"the export address is in use: {err}")
                    raise SourceError(f"qemu-nbd did not start: {err or 'timeout'}")
                time.sleep(0.05)
            on_ready(uri)
            try:
                rc = child.wait()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way to stop serving
                _stop(child)
            else:
                raise SourceError(f"qemu-nbd stopped (exit {rc}): {_tail(log)}")
    finally:
        if child is not None:
            _stop(child)
        blobs.close()
        if opts.socket and os.path.exists(opts.socket):
            try:
                os.unlink(opts.socket)
            except OSError:
                pass
    return ServeResult(uri, repo.traffic.bytes_read - before, time.monotonic() - t0)


def _log_file() -> IO[bytes]:
    return tempfile.TemporaryFile()


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read()[-2000:].decode(errors="replace").strip()


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
