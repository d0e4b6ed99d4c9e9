"""deltavault backup: back up files and directories."""

from __future__ import annotations

import argparse
import os

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup
from deltavault.cli.common import Context, human, parse_size
from deltavault.cli.volume_backup import add_volume_options, run_volume_backup
from deltavault.errors import ExitCode, UsageError
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="back up files and directories")
    p.add_argument("paths", nargs="*", help="files and directories to back up")
    p.add_argument("--as", dest="as_path", metavar="PATH",
                   help="record the (single) source as PATH: for a snapshot mounted elsewhere")
    p.add_argument("--source-id", help="key for change tracking (default: host and paths)")
    p.add_argument("--host", help="host name to record")
    p.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip names or paths matching GLOB (repeatable)")
    p.add_argument("--one-file-system", action="store_true", help="do not cross mount points")
    p.add_argument("--force", action="store_true", help="read every file, ignoring change detection")
    p.add_argument("--parent", help="compare with this snapshot instead of the catalog or latest")
    p.add_argument("--delta-threshold", type=parse_size, default=None, metavar="SIZE",
                   help="files this large are stored as page patches when changed in place (default 32M)")
    p.add_argument("--workers", type=int, default=0, help="worker threads (default: cores)")
    p.add_argument("--snapshot", choices=["auto", "btrfs", "lvm", "vss", "none"], default="none",
                   help="read from a point-in-time snapshot of each source's volume, removed afterwards "
                        "(auto: btrfs or LVM when the source is on one; default: none)")
    add_volume_options(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.volume:
        return run_volume_backup(ctx)
    if not a.paths:
        raise UsageError("backup needs at least one path")
    if a.as_path and len(a.paths) != 1:
        raise UsageError("--as needs exactly one source path")
    logical = [a.as_path] if a.as_path else [os.path.abspath(p) for p in a.paths]
    opts = FileBackupOptions(excludes=a.exclude, one_file_system=a.one_file_system, read_all=a.force,
                             workers=a.workers)
    if a.delta_threshold:
        opts.delta_threshold = a.delta_threshold
    req = BackupRequest(paths=a.paths, logical_paths=logical, source_id=a.source_id, tags=a.tag,
                        parent=a.parent, options=opts, snapshot=a.snapshot)
    if a.host:
        req.hostname = a.host
    repo = ctx.open_repo()
    with repo.lock(command="backup", wait=a.lock_wait):
        result = run_backup(repo, req, ctx.reporter())
    report(ctx, result)
    return int(ExitCode.PARTIAL) if result.partial else 0


def report(ctx: Context, r: BackupResult) -> None:
    st = r.stats
    problems = [p for p in r.problems if p.partial]
    obj = {"type": "summary", "snapshot": r.snapshot_id, "parent": r.parent, "change_source": r.change_source,
           "files_new": st.files_new, "files_changed": st.files_changed, "files_unmodified": st.files_unmodified,
           "dirs": st.dirs, "bytes_read": st.bytes_read, "bytes_total": st.bytes_total,
           "bytes_added": r.bytes_added, "bytes_downloaded": r.bytes_downloaded,
           "seconds": round(r.seconds, 3), "errors": len(problems), "snapshots": r.snapshots,
           "problems": [{"path": p.path, "kind": p.kind, "message": p.message, "partial": p.partial}
                        for p in r.problems]}
    lines = [
        f"snapshot {short_id(r.snapshot_id)} saved"
        + (f" (parent {short_id(r.parent)}, compared via {r.change_source})" if r.parent else " (first run: no parent)"),
        f"files:      {st.files_new} new, {st.files_changed} changed, {st.files_unmodified} unmodified; {st.dirs} dirs",
        f"read:       {human(st.bytes_read)} of {human(st.bytes_total)}",
        f"added:      {human(r.bytes_added)} to the repository",
        f"downloaded: {human(r.bytes_downloaded)} from the repository",
        f"time:       {r.seconds:.2f} s",
    ]
    for s in r.snapshots:
        lines.append(f"source:     {s['path']} read from a {s['kind']} snapshot"
                     + (f" ({s['snapshot']})" if s["snapshot"] else "") + (f"; {s['note']}" if s["note"] else ""))
    lines += [f"warning:    {p.message}" for p in r.problems if p.kind == "catalog"]
    if problems:
        lines.append(f"{len(problems)} file(s) could not be saved completely:")
        lines += [f"  {p.kind}: {p.path}: {p.message}" for p in problems]
    ctx.emit(obj, "\n".join(lines))
