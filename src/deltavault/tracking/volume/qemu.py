"""qcow2 images: data over NBD from qemu-nbd, changes from persistent dirty bitmaps.

The Linux/KVM counterpart of Hyper-V's resilient change tracking. Each backup adds a new
persistent bitmap ``dv-<checkpoint id>`` *before* it reads anything, exports the image
read-only with qemu-nbd, and reads the previous run's bitmap through the NBD meta context
``qemu:dirty-bitmap:NAME`` and the data through NBD reads (libnbd). Only after the
snapshot is saved is the previous bitmap removed. Every write after the new bitmap was
added is therefore recorded in a bitmap that survives, whatever happens to this run.

A bitmap that is missing, disabled, or flagged ``in-use`` (qemu did not close the image
cleanly, so the bitmap may have missed writes) is not trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from pyroaring import BitMap

from deltavault.errors import SourceError
from deltavault.model.volume import Checkpoint, VolumeManifest
from deltavault.tracking.volume import nbdsock, pagesets, qemuproc
from deltavault.tracking.volume.access import Pending, sweep
from deltavault.tracking.volume.base import Changes, Rejected, find_checkpoint
from deltavault.tracking.volume.nbdlib import load_nbd
from deltavault.tracking.volume.qemuproc import INSPECT_TIMEOUT

NAME = "qemu-bitmap"
PREFIX = "dv-"
STATE_DIRTY = 1  # qemu:dirty-bitmap context
STATE_ZERO = 2  # base:allocation context
MAX_REQUEST = 32 * 1024 * 1024  # qemu-nbd's largest read
STATUS_SPAN = 1 << 30
START_TIMEOUT = 20.0


def _run(args: list[str], what: str, timeout: float = 300) -> str:
    """``args``' output; SourceError if it fails, or if it runs longer than ``timeout``
    seconds or its CPU bound (qemuproc.run)."""
    p = qemuproc.run(args, what, SourceError, timeout=timeout)
    if p.returncode != 0:
        raise SourceError(f"{what}: {qemuproc.explained(p.stderr or p.stdout)}")
    return p.stdout


def image_info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_run(["qemu-img", "info", "--output=json", path],
                                           f"qemu-img info {path}", INSPECT_TIMEOUT))
    return info


def image_map(path: str, fmt: str, start: int, length: int, *,
              timeout: float = INSPECT_TIMEOUT) -> list[dict[str, Any]]:
    """``qemu-img map`` of the guest bytes ``start``.. ``start + length``: the image's ranges
    there, those stored with their place in the file. qemu asks the format for each range, a
    grain or cluster at a time where it is sparse: callers bound that count first."""
    out: list[dict[str, Any]] = json.loads(_run(
        ["qemu-img", "map", "--output=json", "-f", fmt, f"--start-offset={start}", f"--max-length={length}", path],
        f"qemu-img map {path}", timeout))
    return out


def bitmaps(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


class NbdReader:
    """A volume read through an NBD connection (libnbd)."""

    def __init__(self, handle: Any, description: str) -> None:
        self.h = handle
        self.size = int(handle.get_size())
        self.description = description
        self.bytes_read = 0
        # The smallest request the server takes (512 for VHDX and VMDK, 1 for qcow2): libnbd
        # refuses a request that is not a multiple of it, so unaligned reads are widened.
        try:
            self.align = max(1, int(handle.get_block_size(0)))  # LIBNBD_SIZE_MINIMUM
        except Exception:  # an older libnbd without block size constraints
            self.align = 1

    def _pread(self, n: int, offset: int) -> bytes:
        try:
            data: bytes = self.h.pread(n, offset)
        except Exception as exc:  # nbd.Error and transport failures
            raise SourceError(f"{self.description}: NBD read at byte {offset} failed: {exc}") from exc
        return data

    def read_into(self, buf: memoryview, offset: int) -> None:
        a = self.align
        pos = 0
        while pos < len(buf):
            start = offset + pos
            n = min(MAX_REQUEST - start % a, len(buf) - pos)  # widened, still one request
            lo = start - start % a
            hi = min(-(-(start + n) // a) * a, max(self.size, start + n))
            if lo == start and hi == start + n:
                buf[pos:pos + n] = self._pread(n, start)
            else:
                buf[pos:pos + n] = self._pread(hi - lo, lo)[start - lo:start - lo + n]
            pos += n
        self.bytes_read += len(buf)

    def extents(self, context: str) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) of the whole export in one meta context."""
        off = 0
        while off < self.size:
            got: list[tuple[int, list[int]]] = []

            def cb(meta: str, start: int, entries: list[int], err: Any,
                   got: list[tuple[int, list[int]]] = got) -> int:
                if meta == context:
                    got.append((start, list(entries)))
                return 0

            try:
                self.h.block_status(min(self.size - off, STATUS_SPAN), off, cb)
            except Exception as exc:
                raise SourceError(f"{self.description}: NBD block status failed: {exc}") from exc
            if not got:
                raise SourceError(f"{self.description}: the server sent no {context} extents")
            pos = got[0][0]
            ents = got[0][1]
            for i in range(0, len(ents) - 1, 2):
                ln = min(ents[i], self.size - pos)
                if ln > 0:
                    yield pos, ln, ents[i + 1]
                pos += ents[i]
            if pos <= off:
                raise SourceError(f"{self.description}: NBD block status made no progress")
            off = pos

    def zero_pages(self) -> BitMap:
        return pagesets.from_byte_ranges(((o, n) for o, n, f in self.extents("base:allocation")
                                          if f & STATE_ZERO), outward=False)

    def close(self) -> None:
        try:
            self.h.shutdown()
        except Exception:  # closing a connection that may already be gone
            pass


class NbdServer:
    """A read-only qemu-nbd export of one image (of format ``fmt``) on a private unix socket."""

    def __init__(self, image: str, bitmap: str | None, *, fmt: str = "qcow2") -> None:
        nbdsock.sweep_stale()  # those of runs killed before they could remove theirs
        self.dir = nbdsock.make_dir()
        # A unix socket's path has at most 107 bytes, and TMPDIR may be longer: qemu-nbd binds
        # "sock" in its working directory (this one; it wants an absolute path), we connect
        # through our fd of it.
        self.dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.sock = f"/proc/self/fd/{self.dir_fd}/sock"
        args = ["qemu-nbd", "--read-only", "--persistent", "-f", fmt, "-k", "/proc/self/cwd/sock"]
        if bitmap:
            args += ["-B", bitmap]
        args.append(image if os.path.isabs(image) else os.path.join(os.getcwd(), image))  # (its cwd is not ours)
        try:
            self.proc = qemuproc.spawn(args, stderr=subprocess.PIPE, cwd=self.dir)
        except OSError as exc:
            os.close(self.dir_fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SourceError(f"cannot start qemu-nbd: {exc}") from exc

    def connect(self, contexts: list[str]) -> Any:
        """A libnbd handle connected to the export. A server that cannot be reached is
        stopped here (its socket directory removed), whoever forgets to call ``stop``."""
        try:
            return self._connect(contexts)
        except BaseException:
            self.stop()
            raise

    def _connect(self, contexts: list[str]) -> Any:
        nbd = load_nbd()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SourceError(f"qemu-nbd exited: {qemuproc.explained(err)}")
            if os.path.exists(self.sock):
                h = nbd.NBD()
                for c in contexts:
                    h.add_meta_context(c)
                try:
                    h.connect_unix(self.sock)
                    return h
                except nbd.Error:
                    pass
            if time.monotonic() > deadline:
                raise SourceError("qemu-nbd did not start listening in time")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
        shutil.rmtree(self.dir, ignore_errors=True)


class NbdHeld:
    """An access that reads through a qemu-nbd of its own: ``_disconnect`` lets go of the
    reader, then stops the server (both may already be gone)."""

    reader: NbdReader | None
    server: NbdServer | None

    def _disconnect(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.server is not None:
            self.server.stop()
            self.server = None


class QcowAccess(NbdHeld):
    """A qcow2 image. ``track``: manage dirty bitmaps (else only read the image)."""

    kind = "qcow2"
    source_format = "qcow2"

    def __init__(self, path: str, *, track: bool, granularity: int, pending: Pending) -> None:
        self.path = path
        self.track = track
        self.granularity = granularity
        self.pending = pending
        self.server: NbdServer | None = None
        self.reader: NbdReader | None = None
        self.prev: Checkpoint | None = None
        self.prev_problem = ""
        self.new_name: str | None = None
        self.new_id = ""
        self.export: str | None = None
        self.existing: dict[str, dict[str, Any]] = {}

    def open(self, prev: Checkpoint | None, new_id: str) -> NbdReader:
        info = image_info(self.path)
        if info.get("format") != "qcow2":
            raise SourceError(f"{self.path} is {info.get('format')}, not qcow2")
        self.existing = bitmaps(info)
        self.prev = prev
        export: str | None = None
        if prev is not None:
            b = self.existing.get(prev.token)
            if b is None:
                self.prev_problem = f"bitmap {prev.token} is missing from the image"
            elif "in-use" in b.get("flags", []):
                self.prev_problem = (f"bitmap {prev.token} is inconsistent (flagged in-use: qemu did not "
                                     "close the image cleanly, so writes may be missing)")
            elif "auto" not in b.get("flags", []):
                self.prev_problem = f"bitmap {prev.token} is disabled: it did not record writes"
            elif prev.token != PREFIX + prev.id:
                self.prev_problem = f"bitmap {prev.token} does not belong to checkpoint {prev.id}"
            else:
                export = prev.token
        if self.track:
            # The new bitmap first: from here on every write is recorded somewhere that stays.
            self.new_id = new_id
            self.new_name = PREFIX + new_id
            self.pending.add_pending(NAME, self.new_name, self.path)
            _run(["qemu-img", "bitmap", "--add", "--granularity", str(self.granularity), self.path,
                  self.new_name], f"adding dirty bitmap {self.new_name} to {self.path}")
        self.server = NbdServer(self.path, export)
        contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{export}"] if export else [])
        h = self.server.connect(contexts)
        self.reader = NbdReader(h, f"{self.path} (qcow2 over NBD)")
        self.export = export
        return self.reader

    def native(self) -> QemuBitmapSource | None:
        return QemuBitmapSource(self) if self.track else None

    def _remove(self, name: str) -> str | None:
        try:
            _run(["qemu-img", "bitmap", "--remove", self.path, name], f"removing bitmap {name}")
        except SourceError as exc:
            return str(exc)
        return None

    def commit(self) -> list[str]:
        self._disconnect()
        # Without tracking (another --cbt mode) the new snapshot carries no bitmap checkpoint,
        # so the last bitmap is retired too: it would only go on recording every write.
        previous = (self.prev.token if self.prev is not None and self.prev.source == NAME
                    and self.prev.token.startswith(PREFIX) else None)
        return sweep(self.pending, NAME, self.path, keep=self.new_name, previous=previous,
                     exists=lambda name: name in self.existing, remove=self._remove, what="bitmap")

    def abort(self) -> None:
        self._disconnect()
        if self.new_name and self._remove(self.new_name) is None:
            self.pending.drop_pending(self.new_name)

    def close(self) -> None:
        self._disconnect()

    def checkpoint(self) -> Checkpoint | None:
        if not self.new_name:
            return None
        return Checkpoint(source=NAME, id=self.new_id, token=self.new_name)


class QemuBitmapSource:
    name = NAME

    def __init__(self, access: QcowAccess) -> None:
        self.access = access

    def changes(self, prev: VolumeManifest | None) -> Changes:
        ck = find_checkpoint(prev, NAME)
        a = self.access
        if a.prev is None or a.prev.id != ck.id:
            raise Rejected("the previous checkpoint was not opened")
        if a.prev_problem:
            raise Rejected(a.prev_problem)
        assert a.reader is not None and a.export is not None
        dirty = [(o, n) for o, n, f in a.reader.extents(f"qemu:dirty-bitmap:{a.export}") if f & STATE_DIRTY]
        pages = pagesets.from_byte_ranges(dirty, outward=True)
        nbytes = sum(n for _o, n in dirty)
        return Changes(NAME, pages, dirty_bytes=nbytes,
                       notes=[f"bitmap {a.export}: {len(dirty)} dirty extents, {nbytes} bytes"])

    def checkpoint(self) -> Checkpoint | None:
        return self.access.checkpoint()
