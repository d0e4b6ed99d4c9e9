"""Restore a files snapshot (or chosen paths of it) with its metadata.

Safety: every path operation is relative to an open directory fd with O_NOFOLLOW, names
are checked to be single components, and duplicate names in a tree are refused, so a
tampered repository cannot write outside the target, not even through symlinks it
restores itself or that already exist in the target.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from deltavault.backup.previous import decode_tree
from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, DeltavaultError, NoSpace
from deltavault.fs.clone import pwrite_all
from deltavault.fs.meta import (
    ApplyProblems,
    apply_meta_fd,
    apply_mode,
    apply_owner,
    apply_times,
    apply_xattrs,
)
from deltavault.fs.paths import check_name, display, open_target_dir, proc_path
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.patch import apply_patches
from deltavault.progress import NullReporter, Reporter
from deltavault.workers import BoundedPool


class BlobReader(Protocol):
    def load_blob(self, blob_id: bytes) -> bytes: ...

    def blob_id(self, data: bytes | memoryview) -> bytes: ...

    def load_blobs(self, ids: list[bytes]) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass
class RestoreOptions:
    include: list[str] = field(default_factory=list)  # paths inside the snapshot; empty = all
    verify: bool = False
    owner: bool = True  # chown (effective only as root)
    workers: int = 3


@dataclass
class RestoreProblem:
    path: str
    kind: str  # corrupt | write | metadata | verify
    message: str


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    special: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0


class _Dir:
    """A restored directory whose metadata waits for everything below it: its mode may
    forbid writes and its times change with every entry made in it. ``left`` counts the
    walker's hold (released when its listing is done), its files being written and its
    subdirectories not yet finished."""

    __slots__ = ("fd", "left", "node", "parent", "relpath")

    def __init__(self, fd: int, relpath: bytes, node: Node, parent: _Dir | None) -> None:
        self.fd, self.relpath, self.node, self.parent = fd, relpath, node, parent
        self.left = 1


# Files handed to the workers and not yet written. It bounds memory and the directories
# held open (each waits for its last file), while the walker keeps ahead of the workers.
IN_FLIGHT = 64
# Files smaller than this are written by the walker itself; larger ones by the workers,
# where decompression, decryption and hashing release the GIL for long stretches.
INLINE_BELOW = 1024 * 1024
SMALL_FILES = 256  # a batch of small files: at most this many,
SMALL_BYTES = 16 * 1024 * 1024  # and about this much content


@dataclass
class _Selection:
    whole: bool  # restore everything below
    children: dict[bytes, _Selection] = field(default_factory=dict)


def _selection(include: list[str]) -> _Selection:
    if not include:
        return _Selection(True)
    root = _Selection(False)
    for inc in include:
        parts = [os.fsencode(p) for p in inc.strip("/").split("/") if p and p != "."]
        cur = root
        for p in parts:
            cur = cur.children.setdefault(p, _Selection(False))
        cur.whole = True
    return root


BATCH_BYTES = 64 * 1024 * 1024


class FileRestorer:
    def __init__(self, repo: BlobReader, target: str | bytes, options: RestoreOptions,
                 reporter: Reporter | None = None) -> None:
        self.repo = repo
        self.target = os.fsencode(target)
        self.opts = options
        self.reporter = reporter or NullReporter()
        self.problems: list[RestoreProblem] = []
        self.stats = RestoreStats()
        self._links: dict[tuple[int, int], bytes] = {}
        self._pool = BoundedPool(options.workers, IN_FLIGHT, "dv-restore")
        self._lock = threading.Lock()
        self._fatal: BaseException | None = None  # the first error that ends the restore
        self._small: list[tuple[int, bytes, Node, _Dir | None]] = []
        self._small_bytes = 0
        self._found: set[bytes] = set()

    def _problem(self, path: bytes, kind: str, message: str) -> None:
        p = RestoreProblem(display(path), kind, message)
        self.problems.append(p)
        self.reporter.problem(p.path, kind, message)

    # ------------------------------------------------------------------ entry
    def run(self, root_tree: bytes) -> RestoreStats:
        fd = open_target_dir(self.target, "restore target")
        self.reporter.start("restore")
        try:
            self._restore_tree(fd, b"", root_tree, _selection(self.opts.include), None)
            self._flush_small()
        finally:
            for _fd, _rel, _node, here in self._small:  # not written: an error ends the run
                self._release(here)
            self._pool.shutdown()
            os.close(fd)
            self.reporter.finish()
        self._check_fatal()
        for inc in self.opts.include:
            if os.fsencode(inc.strip("/")) not in self._found:
                self._problem(os.fsencode(inc), "missing", "not in the snapshot")
        return self.stats

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _hold(self, d: _Dir | None) -> None:
        """One more thing below ``d`` to finish before its metadata is applied."""
        if d is not None:
            with self._lock:
                d.left += 1

    def _release(self, d: _Dir | None) -> None:
        """One thing below ``d`` is finished; the last one applies its metadata, then
        counts for its parent."""
        while d is not None:
            with self._lock:
                d.left -= 1
                if d.left:
                    return
            try:
                self._apply_meta_fd(d.fd, d.relpath, d.node)
            finally:
                os.close(d.fd)
            with self._lock:
                self.stats.dirs += 1
            d = d.parent

    def _load_tree(self, tree_id: bytes, relpath: bytes) -> list[Node]:
        nodes = decode_tree(self.repo.load_blob(tree_id)).nodes
        seen: set[bytes] = set()
        for n in nodes:
            check_name(n.name)
            if n.name in seen:
                raise CorruptionError(f"tree {display(relpath) or '/'} lists {display(n.name)} twice")
            seen.add(n.name)
        return nodes

    # ------------------------------------------------------------------ tree walk
    def _restore_tree(self, dir_fd: int, relpath: bytes, tree_id: bytes, sel: _Selection,
                      here: _Dir | None) -> None:
        try:
            nodes = self._load_tree(tree_id, relpath)
        except DeltavaultError as exc:
            self._problem(relpath or b"/", "corrupt", f"directory listing unreadable: {exc}")
            return
        for node in nodes:
            child_sel = sel if sel.whole else sel.children.get(node.name)
            if child_sel is None:
                continue
            child_rel = relpath + b"/" + node.name if relpath else node.name
            if child_sel.whole and not sel.whole:
                self._found.add(child_rel)
            self._check_fatal()
            try:
                self._restore_node(dir_fd, child_rel, node, child_sel, here)
            except NoSpace:
                raise
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"restore target is full while writing {display(child_rel)}") from exc
                self._problem(child_rel, "write", exc.strerror or str(exc))

    def _restore_node(self, dir_fd: int, relpath: bytes, node: Node, sel: _Selection,
                      here: _Dir | None) -> None:
        name = node.name
        if node.type == NodeType.DIR:
            self._mkdir(dir_fd, name)
            sub = _Dir(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd),
                       relpath, node, here)
            self._hold(here)
            try:
                if node.subtree is not None:
                    self._restore_tree(sub.fd, relpath, node.subtree, sel, sub)
            finally:
                self._release(sub)  # the listing is done; the last file written finishes it
            return
        if not sel.whole:
            return  # a path through a non-directory: nothing selected below
        self._remove_existing(dir_fd, name)
        if node.type == NodeType.FILE:
            key = (node.dev, node.inode) if node.links > 1 else None
            if key is not None and key in self._links:
                os.link(self._links[key], name, dst_dir_fd=dir_fd, follow_symlinks=False)
                self.stats.links += 1
                return
            if key is not None:
                self._links[key] = os.path.join(self.target, relpath)
            if node.size < INLINE_BELOW and key is None:
                # Written by the walker, in batches: handing small files to threads cost more
                # in GIL hand-offs (a million futex calls for 10k files) than writing them,
                # and one read per batch fetches neighbouring blobs together.
                self._hold(here)
                self._small.append((dir_fd, relpath, node, here))
                self._small_bytes += node.size
                if len(self._small) >= SMALL_FILES or self._small_bytes >= SMALL_BYTES:
                    self._flush_small()
                return
            self._hold(here)
            try:
                fut = self._pool.submit(self._restore_file_task, dir_fd, relpath, node, here)
            except BaseException:
                self._release(here)
                raise
            if key is not None:
                fut.result()  # a link to it may follow at once
            return
        if node.type == NodeType.SYMLINK:
            os.symlink(node.target, name, dir_fd=dir_fd)
        elif node.type == NodeType.FIFO:
            os.mkfifo(name, 0o600, dir_fd=dir_fd)
        else:
            kind = stat.S_IFCHR if node.type == NodeType.CHARDEV else stat.S_IFBLK
            os.mknod(name, kind | 0o600, node.rdev, dir_fd=dir_fd)
        self.stats.special += 1
        self._apply_meta_path(dir_fd, relpath, node)

    def _mkdir(self, dir_fd: int, name: bytes) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dir_fd)
                os.mkdir(name, 0o700, dir_fd=dir_fd)

    def _remove_existing(self, dir_fd: int, name: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", name)
        os.unlink(name, dir_fd=dir_fd)

    # ------------------------------------------------------------------ files
    def _restore_file_task(self, dir_fd: int, relpath: bytes, node: Node, here: _Dir | None) -> None:
        """On a worker. ``dir_fd`` stays open until ``here`` is released. An error that ends
        the restore is kept for the walker, which stops at its next entry."""
        try:
            if self._fatal is None:
                self._restore_file_guarded(dir_fd, relpath, node)
        except BaseException as exc:
            with self._lock:
                if self._fatal is None:
                    self._fatal = exc
        finally:
            self._release(here)

    def _flush_small(self) -> None:
        """Write the batched small files, their blobs read in one pass (load_blobs merges
        neighbours in a pack into one request)."""
        items, self._small, self._small_bytes = self._small, [], 0
        ids = list(dict.fromkeys(r.id for _fd, _rel, n, _d in items for r in n.content if isinstance(r, Full)))
        try:
            loaded = dict(self.repo.load_blobs(ids)) if ids else {}
        except DeltavaultError:
            loaded = {}  # a damaged blob: each file loads its own and reports only itself
        for i, (dir_fd, relpath, node, here) in enumerate(items):
            try:
                self._restore_file_guarded(dir_fd, relpath, node, loaded)
            except BaseException:
                for _fd, _rel, _node, later in items[i + 1:]:
                    self._release(later)
                raise
            finally:
                self._release(here)

    def _restore_file_guarded(self, dir_fd: int, relpath: bytes, node: Node,
                              loaded: dict[bytes, bytes] | None = None) -> None:
        try:
            self._restore_file(dir_fd, relpath, node, loaded)
        except NoSpace:
            raise
        except CorruptionError as exc:
            self._problem(relpath, "corrupt", str(exc))
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise NoSpace(f"restore target is full while writing {display(relpath)}") from exc
            self._problem(relpath, "write", exc.strerror or str(exc))

    def _restore_file(self, dir_fd: int, relpath: bytes, node: Node,
                      loaded: dict[bytes, bytes] | None = None) -> None:
        name = node.name
        tmp = b".dv-restore-" + os.urandom(6).hex().encode() + b"-" + name[:120]
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            expect = self._write_content(fd, node.content, loaded or {})
            os.ftruncate(fd, node.size)
            if self.opts.verify:
                os.fsync(fd)
            self._apply_meta_fd(fd, relpath, node)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if self.opts.verify:
            self._verify(dir_fd, relpath, name, node, expect)
        with self._lock:
            self.stats.files += 1
            self.stats.bytes_written += node.size
        self.reporter.advance(nbytes=node.size, items=1, current=display(relpath))

    def _write_content(self, fd: int, refs: list[ContentRef],
                       loaded: dict[bytes, bytes]) -> list[tuple[int, int, bytes | None]]:
        """Write every reference at its offset, in batches of bounded memory. Returns what
        --verify checks: (offset, size, blob id of the bytes, or None for a hole)."""
        expect: list[tuple[int, int, bytes | None]] = []
        off = 0
        batch: list[tuple[int, ContentRef]] = []
        batch_bytes = 0
        for ref in refs:
            batch.append((off, ref))
            off += ref.size
            batch_bytes += 0 if isinstance(ref, Hole) else ref.size
            if batch_bytes >= BATCH_BYTES:
                self._write_batch(fd, batch, expect, loaded)
                batch, batch_bytes = [], 0
        self._write_batch(fd, batch, expect, loaded)
        return expect

    def _write_batch(self, fd: int, batch: list[tuple[int, ContentRef]],
                     expect: list[tuple[int, int, bytes | None]], preloaded: dict[bytes, bytes]) -> None:
        wanted = list(dict.fromkeys(r.id for _, r in batch if isinstance(r, Full) and r.id not in preloaded))
        loaded = dict(self.repo.load_blobs(wanted)) if wanted else {}
        for o, ref in batch:
            if isinstance(ref, Hole):
                expect.append((o, ref.size, None))
                continue
            if isinstance(ref, Full):
                data = preloaded[ref.id] if ref.id in preloaded else loaded[ref.id]
                if len(data) != ref.size:
                    raise CorruptionError(f"blob {ref.id.hex()[:16]} has {len(data)} bytes, tree says {ref.size}")
                digest = ref.id  # load_blobs checked the bytes against it
            elif isinstance(ref, Patch):
                data = apply_patches(self.repo.load_blob(ref.base),
                                     [self.repo.load_blob(p) for p in ref.patches], ref.size)
                digest = self.repo.blob_id(data) if self.opts.verify else b""
            else:
                raise CorruptionError(f"unknown content reference {ref!r}")
            pwrite_all(fd, data, o)
            expect.append((o, ref.size, digest))

    def _verify(self, dir_fd: int, relpath: bytes, name: bytes, node: Node,
                expect: list[tuple[int, int, bytes | None]]) -> None:
        """Re-read what was written, bypassing the page cache, and check every range
        against its blob id; holes must read as zeros."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        bad: list[str] = []
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(fd).st_size
            if size != node.size:
                bad.append(f"size {size}, expected {node.size}")
            for off, ln, digest in expect:
                if digest is None:
                    if not _zeros(fd, off, ln):
                        bad.append(f"hole at {off} holds data")
                    continue
                data = os.pread(fd, ln, off)
                with self._lock:
                    self.stats.bytes_verified += len(data)
                if len(data) != ln or self.repo.blob_id(data) != digest:
                    bad.append(f"bytes {off}..{off + ln} differ")
        finally:
            os.close(fd)
        if bad:
            self._problem(relpath, "verify", "read back differs from what was written: " + "; ".join(bad[:5]))

    # ------------------------------------------------------------------ metadata
    def _apply_meta_fd(self, fd: int, relpath: bytes, node: Node) -> None:
        probs = ApplyProblems([])
        apply_meta_fd(fd, probs, mode=node.mode, uid=node.uid, gid=node.gid, atime_ns=node.atime,
                      mtime_ns=node.mtime, xattrs=node.xattrs, owner=self.opts.owner)
        for m in probs.messages:
            self._problem(relpath, "metadata", m)

    def _apply_meta_path(self, dir_fd: int, relpath: bytes, node: Node) -> None:
        """Symlinks and special files: never opened, never followed."""
        probs = ApplyProblems([])
        path = proc_path(dir_fd, node.name)
        apply_xattrs(path, node.xattrs, probs)
        if self.opts.owner:
            apply_owner(path, node.uid, node.gid, probs)
        if node.type != NodeType.SYMLINK:
            apply_mode(path, node.mode, probs)
        apply_times(path, node.atime, node.mtime, probs)
        for m in probs.messages:
            self._problem(relpath, "metadata", m)


_ZEROS = bytes(1 << 20)


def _zeros(fd: int, off: int, ln: int) -> bool:
    """Whether [off, off+ln) reads as zeros; a range with no data extent needs no read."""
    try:
        nxt = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        return True  # no data at or after off
    pos = max(off, nxt)
    end = off + ln
    while pos < end:
        data = os.pread(fd, min(len(_ZEROS), end - pos), pos)
        if not data:
            return True
        if data != _ZEROS[:len(data)]:
            return False
        pos += len(data)
    return True
