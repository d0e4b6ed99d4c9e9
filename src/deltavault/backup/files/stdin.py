"""Backing up a stream as one file: ``backup --stdin`` and ``--stdin-from-command`` (a
database dump, say). The stream is cut by the same content-defined chunker as files, so
a dump that changed a little stores little. With a command, its exit status decides:
a command that fails leaves no snapshot (what it wrote is indexed, and unreferenced, so
the next prune removes it)."""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from deltavault.backup.files.fileio import WINDOW
from deltavault.backup.files.options import FileStats, Problem
from deltavault.backup.files.run import BackupResult, chunker_for, default_source_id
from deltavault.errors import SourceError, UsageError
from deltavault.fs.meta import group_name, user_name
from deltavault.model.content import ContentRef, Full
from deltavault.model.nodes import Node, NodeType
from deltavault.model.snapshot import SnapshotSummary
from deltavault.model.types import BlobType
from deltavault.objects.trees import encode_tree
from deltavault.progress import NullReporter, Reporter
from deltavault.repository.hosttag import HostTagger
from deltavault.repository.packcheck import PackCheck
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import new_snapshot


@dataclass
class StdinRequest:
    filename: str = "stdin"
    command: list[str] = field(default_factory=list)  # empty: read this process's stdin
    hostname: str = field(default_factory=socket.gethostname)
    tags: list[str] = field(default_factory=list)
    dry_run: bool = False


def run_stdin_backup(repo: Repository, req: StdinRequest, reporter: Reporter | None = None) -> BackupResult:
    reporter = reporter or NullReporter()
    name = os.fsencode(req.filename)
    if not name or b"/" in name or name in (b".", b".."):
        raise UsageError(f"--stdin-filename must be a single file name, not {req.filename!r}")
    t0 = time.monotonic()
    start_ns = time.time_ns()
    logical = ["/" + req.filename]
    source_id = default_source_id(req.hostname, logical)
    proc = None
    if req.command:
        try:
            proc = subprocess.Popen(req.command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SourceError(f"cannot run {shlex.join(req.command)}: {exc.strerror or exc}") from exc
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
    else:
        fd = 0
        if os.isatty(fd):
            raise UsageError("--stdin reads standard input, which is a terminal: pipe the data in")
    # Blobs of packs gone from the repository must not be deduplicated against (packcheck.py).
    packs = PackCheck() if req.dry_run else repo.check_packs()
    reporter.start("backup")
    try:
        refs, size, added = _store_stream(repo, fd, reporter, dry_run=req.dry_run)
    finally:
        reporter.finish()
        if proc is not None:
            assert proc.stdout is not None
            proc.stdout.close()
            rc = proc.wait()
    if proc is not None and rc != 0:
        what = f"signal {-rc}" if rc < 0 else f"status {rc}"
        raise SourceError(f"{shlex.join(req.command)} exited with {what}; no snapshot was saved")
    uid, gid = os.getuid(), os.getgid()
    now = time.time_ns()
    node = Node(name=name, type=NodeType.FILE, mode=0o644, uid=uid, gid=gid, user=user_name(uid),
                group=group_name(gid), mtime=now, atime=now, ctime=now, size=size, content=refs)
    tree = encode_tree([node])
    parents = [s for s in repo.list_snapshots() if s[1].source_id == source_id]
    parent = parents[-1][0] if parents else None
    if req.dry_run:
        root = repo.blob_id(tree)
    else:
        root, _ = repo.save_blob(BlobType.TREE, tree)
        repo.flush()
        added = repo.write_stats.bytes_written
    stats = FileStats(files_new=1, bytes_read=size, bytes_total=size)
    summary = SnapshotSummary(files_new=1, bytes_processed=size, bytes_total=size, bytes_added=added,
                              bytes_downloaded=repo.traffic.bytes_read, blobs_added=repo.write_stats.blobs_added,
                              seconds=round(time.monotonic() - t0, 3))
    snap = HostTagger.for_repository(repo).sign(new_snapshot(
        start_ns=start_ns, hostname=req.hostname, kind="files", paths=logical, source_id=source_id, tree=root,
        parent=parent, tags=req.tags, summary=summary))
    sid = None if req.dry_run else repo.save_snapshot(snap)
    warn = packs.warning()
    notes = [Problem(repo.backend.location(), "repository", warn, partial=False)] if warn else []
    return BackupResult(sid, snap, stats, notes, "none", parent, added, summary.bytes_downloaded,
                        time.monotonic() - t0, dry_run=req.dry_run, packs=packs)


def _store_stream(repo: Repository, fd: int, reporter: Reporter, *, dry_run: bool) -> tuple[list[ContentRef], int, int]:
    """Cut the stream ``fd`` into chunks and store them (two at a time on workers); returns
    the references, the stream's size and (dry run) the bytes new chunks would add."""
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise UsageError("standard input is a directory")
    chunker = chunker_for(repo)
    pending: deque[Future[ContentRef]] = deque()
    refs: list[ContentRef] = []
    seen: set[bytes] = set()
    size = would_add = 0

    def save(data: bytes) -> ContentRef:
        nonlocal would_add
        if dry_run:
            bid = repo.blob_id(data)
            if bid not in seen and not repo.has_blob(bid):
                seen.add(bid)
                would_add += len(data)
            return Full(bid, len(data))
        bid, _ = repo.save_blob(BlobType.DATA, data)
        return Full(bid, len(data))

    buf = b""
    with ThreadPoolExecutor(2, thread_name_prefix="dv-stdin") as pool:
        eof = False
        while not eof:
            piece = _read_window(fd)
            eof = not piece
            size += len(piece)
            reporter.advance(nbytes=len(piece))
            buf += piece
            cuts = chunker.cut(buf)
            # the last chunk is cut again with the next window, so boundaries do not depend
            # on how the pipe delivered the bytes
            done = cuts if eof else cuts[:-1]
            for off, length in done:
                pending.append(pool.submit(save, buf[off:off + length]))
            buf = buf[done[-1][0] + done[-1][1]:] if done else buf
            while len(pending) > 8 or (pending and pending[0].done()):
                refs.append(pending.popleft().result())
        refs.extend(f.result() for f in pending)
    return refs, size, would_add


def _read_window(fd: int) -> bytes:
    """Up to WINDOW bytes from a pipe; b"" only at its end."""
    parts = []
    got = 0
    while got < WINDOW:
        piece = os.read(fd, WINDOW - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)
