"""deltavault sync: mirror a directory (optionally from a point-in-time snapshot)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Any

from deltavault.cli.common import Context, human, parse_size, problem_lines
from deltavault.cli.ratelimit_pipe import wrap
from deltavault.errors import DeltavaultError, ExitCode, SourceError, TargetError, UsageError
from deltavault.snapshot import SNAPSHOT_KINDS, take_snapshot
from deltavault.sync.guard import check_live_source
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.pull import PullSyncer
from deltavault.sync.push import PushSyncer
from deltavault.sync.report import SyncLog, SyncResult
from deltavault.sync.ssh import DEFAULT_REMOTE, parse_remote


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="mirror SRC to DST (new and changed files; --delete for extras)",
                       description="Mirror SRC to DST. Files are written under a temp name and renamed "
                       "into place. Big changed files get only their changed pages rewritten.")
    p.add_argument("source", metavar="SRC")
    p.add_argument("dest", metavar="DST")
    p.add_argument("--delete", action="store_true", help="remove entries in DST that SRC does not have")
    p.add_argument("--checksum", action="store_true", help="compare content, not size and mtime")
    p.add_argument("--skip-empty-dirs", action="store_true", help="do not create directories left empty")
    p.add_argument("--acl", action="store_true", help="keep POSIX ACLs; from an ntfs-3g mount also the NTFS "
                   "security descriptor, DOS attributes and times")
    p.add_argument("--streams", action="store_true", help="keep NTFS named streams, from an ntfs-3g mount; "
                   "onto other file systems as user. xattrs where they fit")
    p.add_argument("--xattrs", action="store_true", help="keep extended attributes")
    p.add_argument("--no-owner", action="store_true", help="do not keep owner and group")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching entries")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="take only matching files (directories are still searched)")
    p.add_argument("--no-default-excludes", action="store_true",
                   help="also copy $RECYCLE.BIN, System Volume Information at the root of SRC")
    p.add_argument("--verify", action="store_true",
                   help="re-read each written file from disk and compare its BLAKE3 digest")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--continue-on-error", dest="stop_on_error", action="store_false", default=False,
                   help="list errors and go on (default)")
    g.add_argument("--stop-on-error", dest="stop_on_error", action="store_true",
                   help="stop at the first error")
    p.add_argument("--log", metavar="FILE", help="append one line per entry to FILE")
    p.add_argument("--bufsize", type=_mb, default=SyncOptions.bufsize, metavar="MB",
                   help="I/O buffer per copy thread, in MB or with a unit (256K); default 1")
    p.add_argument("--threads", type=int, default=2, help="threads copying big files (default 2)")
    p.add_argument("--processes", type=int, default=2,
                   help="worker processes walking subtrees (default 2; 1 walks in one process)")
    p.add_argument("--no-delta", action="store_true", help="copy changed files whole")
    p.add_argument("--delta-min", type=parse_size, default=SyncOptions.delta_min, metavar="SIZE",
                   help="smallest file updated by delta (default 4MiB)")
    p.add_argument("--inplace", action="store_true",
                   help="let delta write into the existing file when no reflink clone is possible "
                   "(fewer writes; not atomic)")
    p.add_argument("--snapshot", choices=SNAPSHOT_KINDS, default="none",
                   help="sync from a point-in-time snapshot of SRC's volume (default none)")
    p.add_argument("--rsh", default=os.environ.get("DELTAVAULT_RSH", "ssh"), metavar="CMD",
                   help="for SRC or DST on another host ([user@]host:path or ssh://...): the ssh command "
                   "(default ssh; env DELTAVAULT_RSH)")
    p.add_argument("--remote-command", default=os.environ.get("DELTAVAULT_REMOTE_COMMAND", DEFAULT_REMOTE),
                   metavar="CMD", help=f"deltavault on the other host (default '{DEFAULT_REMOTE}'; "
                   "env DELTAVAULT_REMOTE_COMMAND)")
    p.set_defaults(func=run)


def _options(a: argparse.Namespace) -> SyncOptions:
    return SyncOptions(delete=a.delete, checksum=a.checksum, skip_empty_dirs=a.skip_empty_dirs, acl=a.acl,
                       xattrs=a.xattrs, streams=a.streams, owner=not a.no_owner, excludes=a.exclude, includes=a.include,
                       default_excludes=not a.no_default_excludes, verify=a.verify,
                       stop_on_error=a.stop_on_error, bufsize=a.bufsize,
                       threads=max(1, a.threads), processes=max(1, a.processes), delta=not a.no_delta, delta_min=a.delta_min,
                       inplace=a.inplace)


def _mb(text: str) -> int:
    """A plain number is MB (FastCopy's unit); '256K' and the like are sizes."""
    n = parse_size(text + "M" if text.strip().isdigit() else text)
    if not 4096 <= n <= 1 << 30:
        raise argparse.ArgumentTypeError("the buffer must be between 4K and 1G")
    return n


def run(ctx: Context) -> int:
    a = ctx.args
    opts = _options(a)
    src_host, where = parse_remote(a.source), parse_remote(a.dest)
    if src_host is not None and where is not None:
        raise UsageError("SRC and DST cannot both be on other hosts: run deltavault sync on one of them")
    if a.limit_upload or a.limit_download:
        if src_host is None and where is None:
            ctx.warn("--limit-upload and --limit-download hold a sync with another host; this one is local")
        else:  # the ssh connection runs through a relay that keeps to the rates
            a.rsh = shlex.join(wrap(shlex.split(a.rsh), a.limit_upload, a.limit_download))
    log = SyncLog(a.log) if a.log else None
    t0 = time.monotonic()
    snap_info: dict[str, Any]
    try:
        if src_host is not None:  # a pull: the snapshot, if any, is taken on the source host
            snap_info = {"kind": a.snapshot, "on": src_host.host}
            result = _attempt(ctx, PullSyncer(src_host, a.dest, opts, ctx.reporter(), log, rsh=a.rsh,
                                              remote=a.remote_command, snapshot=a.snapshot), snap_info, t0)
        else:
            if where is None and a.snapshot != "none":
                check_live_source(os.fsencode(a.source), os.fsencode(a.dest))
            with take_snapshot(a.source, a.snapshot) as snap:
                snap_info = {"kind": snap.kind, "mount_path": snap.mount_path, "source_path": snap.source_path}
                if snap.note:
                    ctx.warn(snap.note)
                syncer: Syncer | PushSyncer
                if where is not None:
                    syncer = PushSyncer(snap.source_path, where, opts, ctx.reporter(), log, rsh=a.rsh,
                                        remote=a.remote_command)
                else:
                    syncer = Syncer(snap.source_path, a.dest, opts, ctx.reporter(), log)
                result = _attempt(ctx, syncer, snap_info, t0)
    finally:
        if log is not None:
            log.close()
    for w in result.warnings:
        ctx.warn(w)
    _summary(ctx, a, result, snap_info, time.monotonic() - t0)
    return int(ExitCode.PARTIAL) if _errors(result) else 0


def _errors(r: SyncResult) -> int:
    """Problems that make the run partial: all but "skipped" (a directory seen a second
    time through a bind mount, or a mount showing SRC or DST, is kept empty on purpose)."""
    return sum(p.kind != "skipped" for p in r.problems)


def _attempt(ctx: Context, syncer: Syncer | PushSyncer | PullSyncer, snap_info: dict[str, Any],
             t0: float) -> SyncResult:
    try:
        return syncer.run()
    except DeltavaultError as exc:
        if not isinstance(exc, UsageError | TargetError | SourceError):  # else refused before starting
            _summary(ctx, ctx.args, syncer.partial(), snap_info, time.monotonic() - t0)
        raise


def _summary(ctx: Context, a: argparse.Namespace, r: SyncResult, snap: dict[str, Any], seconds: float) -> None:
    st = r.stats
    obj = {"type": "summary", "source": a.source, "dest": a.dest, "snapshot": snap, "seconds": round(seconds, 3),
           **st.__dict__, "bytes_written": st.bytes_written, "stopped": r.stopped, "workers": r.workers, "errors": _errors(r),
           "problems": [p.__dict__ for p in r.problems]}
    if r.wire is not None:
        obj["wire_sent"], obj["wire_received"] = r.wire
    text = (f"synced {a.source} -> {a.dest} in {seconds:.1f}s: {st.files_new} new, {st.files_updated} updated, "
            f"{st.files_delta} delta, {st.files_same} unchanged, {st.meta_fixed} metadata only, "
            f"{st.dirs_created} dirs, {st.symlinks} symlinks, {st.hardlinks} hard links, {st.special} special, "
            f"{st.deleted} deleted; wrote {human(st.bytes_written)}")
    if st.files_delta:
        text += (f"\ndelta: wrote {human(st.delta_bytes_written)} of {human(st.delta_file_bytes)} "
                 f"in {st.files_delta} changed file(s)")
    if r.wire is not None:
        text += f"\nnetwork: sent {human(r.wire[0])}, received {human(r.wire[1])}"
        if st.delta_wire_bytes:
            text += f" (delta sent {human(st.delta_wire_bytes)} of file data)"
    if st.ntfs_not_kept:
        text += (f"\nNTFS metadata or streams not kept on {a.dest} for {st.ntfs_not_kept} entr"
                 f"{'y' if st.ntfs_not_kept == 1 else 'ies'}" + (f" (named in {a.log})" if a.log else " (--log names them)"))
    if a.verify:
        text += f"\nverified: {st.files_verified} files, {human(st.bytes_verified)} re-read from disk"
    if snap.get("kind", "none") != "none":
        where = f"taken on {snap['on']}" if "on" in snap else snap["mount_path"]
        text += f"\nfrom {snap['kind']} snapshot {where} (removed)"
    if r.stopped:
        text += "\nstopped at the first error (--stop-on-error)"
    if r.problems:
        skipped = len(r.problems) - _errors(r)
        text += f"\n{_errors(r)} error(s)" + (f", {skipped} skipped" if skipped else "") + ":\n" + "\n".join(
            problem_lines(r.problems))
    ctx.emit(obj, text)
